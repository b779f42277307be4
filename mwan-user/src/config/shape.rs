//! The shapes a config value can have, as serde reads them: a string, an
//! integer, a list of them..., each telling a value of another type what it
//! must be (its visitor's `expecting`, which serde puts in its error: see
//! `error::from_serde`). A string's kind (`Str<kind::Duration>`) says what
//! it is for; what it means is read by validation (values.rs).

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IntoDeserializer, SeqAccess, Visitor};
use toml::Spanned;

use super::error::TABLES;

/// What a value of the wrong type is told it must be
/// (`must be a duration such as "5s", not 5`).
pub(super) trait Described {
    const EXPECTING: &'static str;
}

/// A visitor of shape `T`.
struct Expect<T>(PhantomData<T>);

impl<T> Expect<T> {
    fn new() -> Expect<T> {
        Expect(PhantomData)
    }
}

/// A string; `K` says what it is for (`Str<kind::Duration>`).
pub(super) struct Str<K>(String, PhantomData<K>);

impl<K> Str<K> {
    pub(super) fn as_str(&self) -> &str {
        &self.0
    }
}

impl<K: Described> Described for Str<K> {
    const EXPECTING: &'static str = K::EXPECTING;
}

impl<'de, K: Described> Visitor<'de> for Expect<Str<K>> {
    type Value = Str<K>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(K::EXPECTING)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Str<K>, E> {
        Ok(Str(s.to_owned(), PhantomData))
    }
}

impl<'de, K: Described> Deserialize<'de> for Str<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Expect::<Self>::new())
    }
}

/// An integer; `K` says what it is for (by default, any integer).
pub(super) struct Int<K = Integer>(pub i64, PhantomData<K>);

/// An integer setting with no more to say ("must be an integer").
pub(super) enum Integer {}

impl Described for Integer {
    const EXPECTING: &'static str = "an integer";
}

impl<K: Described> Described for Int<K> {
    const EXPECTING: &'static str = K::EXPECTING;
}

impl<'de, K: Described> Visitor<'de> for Expect<Int<K>> {
    type Value = Int<K>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(K::EXPECTING)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int<K>, E> {
        Ok(Int(v, PhantomData))
    }
}

impl<'de, K: Described> Deserialize<'de> for Int<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_i64(Expect::<Self>::new())
    }
}

/// `true` or `false`.
pub(super) struct Bool(pub bool);

impl Described for Bool {
    const EXPECTING: &'static str = "true or false";
}

impl<'de> Visitor<'de> for Expect<Bool> {
    type Value = Bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(Bool::EXPECTING)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Bool, E> {
        Ok(Bool(v))
    }
}

impl<'de> Deserialize<'de> for Bool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bool(Expect::<Self>::new())
    }
}

/// A number, integer or not; `K` says what it is for.
pub(super) struct Float<K>(pub f64, PhantomData<K>);

impl<'de, K: Described> Visitor<'de> for Expect<Float<K>> {
    type Value = Float<K>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(K::EXPECTING)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Float<K>, E> {
        Ok(Float(v, PhantomData))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Float<K>, E> {
        Ok(Float(v as f64, PhantomData))
    }
}

impl<'de, K: Described> Deserialize<'de> for Float<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_f64(Expect::<Self>::new())
    }
}

/// An integer or a string (`25` or `"8000-8100"`); `K` says what it is for.
pub(super) struct IntOrStr<K>(pub IntOrText, PhantomData<K>);

pub(super) enum IntOrText {
    Int(i64),
    Text(String),
}

impl<K: Described> Described for IntOrStr<K> {
    const EXPECTING: &'static str = K::EXPECTING;
}

impl<'de, K: Described> Visitor<'de> for Expect<IntOrStr<K>> {
    type Value = IntOrStr<K>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(K::EXPECTING)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrStr<K>, E> {
        Ok(IntOrStr(IntOrText::Int(v), PhantomData))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<IntOrStr<K>, E> {
        Ok(IntOrStr(IntOrText::Text(s.to_owned()), PhantomData))
    }
}

impl<'de, K: Described> Deserialize<'de> for IntOrStr<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Expect::<Self>::new())
    }
}

/// A list, each item with its place; a value of the wrong type (the list,
/// or an item) is told what the list must be: `T`'s `EXPECTING`.
pub(super) struct List<T>(pub Vec<Spanned<T>>);

impl<'de, T: Described + Deserialize<'de>> Visitor<'de> for Expect<List<T>> {
    type Value = List<T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List<T>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(List(items))
    }
}

impl<'de, T: Described + Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(Expect::<Self>::new())
    }
}

/// One string or a list of them (`proto = "tcp"`, `proto = ["tcp", "udp"]`),
/// read as a list.
pub(super) struct OneOrMany<T>(pub Vec<Spanned<T>>);

enum OneOrList<T> {
    One(T),
    Many(Vec<Spanned<T>>),
}

impl<'de, T: Described + Deserialize<'de>> Visitor<'de> for Expect<OneOrList<T>> {
    type Value = OneOrList<T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<OneOrList<T>, E> {
        self.visit_string(s.to_owned())
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<OneOrList<T>, E> {
        T::deserialize(s.into_deserializer()).map(OneOrList::One)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<OneOrList<T>, A::Error> {
        Expect::<List<T>>::new()
            .visit_seq(seq)
            .map(|l| OneOrList::Many(l.0))
    }
}

impl<'de, T: Described + Deserialize<'de>> Deserialize<'de> for OneOrList<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Expect::<Self>::new())
    }
}

impl<'de, T: Described + Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The one string's place is the value's.
        let v = Spanned::<OneOrList<T>>::deserialize(d)?;
        let span = v.span();
        Ok(OneOrMany(match v.into_inner() {
            OneOrList::One(t) => vec![Spanned::new(span, t)],
            OneOrList::Many(items) => items,
        }))
    }
}

/// One of the choices of enum `E` (`sticky = "host"`): an unknown one is
/// refused by serde, naming the choices; a value of another type is told
/// them (`"connection" or "host"`).
pub(super) struct Choice<E>(pub E);

impl<'de, E: Deserialize<'de>> Visitor<'de> for Expect<Choice<E>> {
    type Value = Choice<E>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let names = variants::<E>();
        for (i, name) in names.iter().enumerate() {
            let sep = match i {
                0 => "",
                i if i + 1 == names.len() => " or ",
                _ => ", ",
            };
            write!(f, "{sep}\"{name}\"")?;
        }
        Ok(())
    }
    fn visit_str<E2: de::Error>(self, s: &str) -> Result<Choice<E>, E2> {
        self.visit_string(s.to_owned())
    }
    fn visit_string<E2: de::Error>(self, s: String) -> Result<Choice<E>, E2> {
        E::deserialize(s.into_deserializer()).map(Choice)
    }
}

impl<'de, E: Deserialize<'de>> Deserialize<'de> for Choice<E> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Expect::<Self>::new())
    }
}

/// The names of enum `E`'s variants, as serde knows them: what its
/// `Deserialize` asks a deserializer for.
fn variants<'de, E: Deserialize<'de>>() -> &'static [&'static str] {
    struct Names;
    #[derive(Debug)]
    struct Found(&'static [&'static str]);
    impl fmt::Display for Found {
        fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }
    impl std::error::Error for Found {}
    impl de::Error for Found {
        fn custom<T: fmt::Display>(_: T) -> Found {
            Found(&[])
        }
    }
    impl<'de> Deserializer<'de> for Names {
        type Error = Found;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
            Err(Found(&[]))
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Found> {
            Err(Found(variants))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map struct identifier ignored_any
        }
    }
    match E::deserialize(Names) {
        Err(Found(names)) => names,
        Ok(_) => &[],
    }
}

/// The tables of a `[[name]]` list, each with its place (from its header
/// to its last key). Their struct's `expecting` is `error::TABLE`.
pub(super) struct Tables<T>(pub Vec<Spanned<T>>);

impl<T> Default for Tables<T> {
    fn default() -> Self {
        Tables(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Expect<Tables<T>> {
    type Value = Tables<T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(TABLES)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tables<T>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Tables(items))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Tables<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(Expect::<Self>::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, Clone, Copy, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Three {
        Nat,
        Npt,
        Off,
    }

    #[test]
    fn choices_are_named_from_the_enum() {
        assert_eq!(variants::<Three>(), ["nat", "npt", "off"]);
        let e = toml::from_str::<toml::Table>("x = 5").unwrap()["x"]
            .clone()
            .try_into::<Choice<Three>>()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("expected \"nat\", \"npt\" or \"off\""), "{e}");
        let c: Choice<Three> = toml::Value::from("npt").try_into().unwrap();
        assert_eq!(c.0, Three::Npt);
    }
}
