use lab::mwan::{config, Mwan};
use lab::*;
use std::time::Duration;

#[test]
fn scratch_rpf_without_restore() {
    let lab = Lab::builder()
        .lan_hosts(1)
        .isps(2)
        .router_kind(RouterKind::Static)
        .build()
        .unwrap();
    let mwan = Mwan::start(&lab, &config(&lab, "")).unwrap();
    mwan.wait_all_up(Duration::from_secs(5)).unwrap();
    println!("{}", lab.router().sh("nft list table inet mwan").unwrap());
    println!("{}", lab.router().sh("sysctl net.ipv4.conf.wan1.rp_filter net.ipv4.conf.wan1.src_valid_mark net.ipv4.conf.all.rp_filter net.ipv4.conf.lan0.rp_filter").unwrap());
    let ok = many_tcp_whoami(lab.host(0), TCP_WHOAMI, 50, 8)
        .into_iter()
        .filter(|r| r.is_ok())
        .count();
    println!("with restore: {ok}/50");
    // Drop the restore rule (keep the inbound record).
    let h = lab.router().sh("nft -a list chain inet mwan prerouting | grep 'ct mark & 0x00ff0000 vmap' | sed 's/.*handle //'").unwrap();
    lab.router()
        .sh(&format!(
            "nft delete rule inet mwan prerouting handle {}",
            h.trim()
        ))
        .unwrap();
    println!(
        "{}",
        lab.router()
            .sh("nft list chain inet mwan prerouting")
            .unwrap()
    );
    let res = many_tcp_whoami(lab.host(0), TCP_WHOAMI, 50, 8);
    let ok = res.iter().filter(|r| r.is_ok()).count();
    println!(
        "without restore: {ok}/50 {:?}",
        res.iter().find(|r| r.is_err())
    );
    println!(
        "{}",
        lab.router()
            .sh("nstat -az | grep -i -E 'martian|rpfilter|IPReversePathFilter' ; true")
            .unwrap()
    );
    lab.router().sh("ip rule add pref 1005 iif wan1 lookup 1000 && ip rule add pref 1006 iif wan2 lookup 1001").unwrap();
    let res = many_tcp_whoami(lab.host(0), TCP_WHOAMI, 50, 8);
    let ok = res.iter().filter(|r| r.is_ok()).count();
    println!("without restore, iif rules: {ok}/50");
    println!(
        "{}",
        lab.router()
            .sh("nstat -az | grep -i -E 'IPReversePathFilter' ; ip rule")
            .unwrap()
    );
}
