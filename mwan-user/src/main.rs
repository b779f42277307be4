fn main() {
    println!("mwan (under construction)");
}
