//! The two address families, and one value per family.
//!
//! The datapath has one generic path over a `Family` trait with a map of
//! each kind per family (`FLOWS`/`FLOWS6`, `WANS`/`WANS6`, …). Userspace
//! mirrors it: anything that exists once per family is a
//! [`PerFamily<T>`], indexed by [`Family`], never a pair of `*6` twins or a
//! `[T; 2]` with a hand-written index.

use std::fmt;
use std::net::IpAddr;
use std::ops::{Index, IndexMut};

use serde::{Deserialize, Serialize};

/// An address family: each WAN's health and eligibility are judged per
/// family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    /// The other family.
    pub fn other(self) -> Family {
        match self {
            Family::Ipv4 => Family::Ipv6,
            Family::Ipv6 => Family::Ipv4,
        }
    }

    fn index(self) -> usize {
        match self {
            Family::Ipv4 => 0,
            Family::Ipv6 => 1,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        })
    }
}

/// One `T` per address family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PerFamily<T>([T; 2]);

impl<T> PerFamily<T> {
    /// Each family's value from `f`.
    pub fn new(mut f: impl FnMut(Family) -> T) -> PerFamily<T> {
        PerFamily([f(Family::Ipv4), f(Family::Ipv6)])
    }

    /// The same value for both families.
    pub fn both(v: T) -> PerFamily<T>
    where
        T: Clone,
    {
        PerFamily([v.clone(), v])
    }

    pub fn map<U>(self, mut f: impl FnMut(Family, T) -> U) -> PerFamily<U> {
        let [a, b] = self.0;
        PerFamily([f(Family::Ipv4, a), f(Family::Ipv6, b)])
    }

    pub fn as_ref(&self) -> PerFamily<&T> {
        PerFamily([&self.0[0], &self.0[1]])
    }

    /// Each family with its value, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = (Family, &T)> {
        Family::BOTH.into_iter().zip(self.0.iter())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Family, &mut T)> {
        Family::BOTH.into_iter().zip(self.0.iter_mut())
    }

    /// The values, IPv4 first.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }
}

impl<T> Index<Family> for PerFamily<T> {
    type Output = T;
    fn index(&self, f: Family) -> &T {
        &self.0[f.index()]
    }
}

impl<T> IndexMut<Family> for PerFamily<T> {
    fn index_mut(&mut self, f: Family) -> &mut T {
        &mut self.0[f.index()]
    }
}

/// Serialized as `{ "ipv4": …, "ipv6": … }`.
impl<T: Serialize> Serialize for PerFamily<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        for (f, v) in self.iter() {
            m.serialize_entry(&f, v)?;
        }
        m.end()
    }
}

impl<'de, T: Deserialize<'de> + Default> Deserialize<'de> for PerFamily<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw<T> {
            #[serde(default = "Option::default")]
            ipv4: Option<T>,
            #[serde(default = "Option::default")]
            ipv6: Option<T>,
        }
        let r = Raw::<T>::deserialize(d)?;
        Ok(PerFamily([
            r.ipv4.unwrap_or_default(),
            r.ipv6.unwrap_or_default(),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_by_family() {
        let mut p = PerFamily::new(|f| f.to_string());
        assert_eq!(p[Family::Ipv4], "ipv4");
        assert_eq!(p[Family::Ipv6], "ipv6");
        p[Family::Ipv6].push('!');
        let v: Vec<_> = p.iter().map(|(f, s)| format!("{f}={s}")).collect();
        assert_eq!(v, ["ipv4=ipv4", "ipv6=ipv6!"]);
        assert_eq!(p.map(|_, s| s.len())[Family::Ipv6], 5);
        assert_eq!(Family::Ipv4.other(), Family::Ipv6);
    }

    #[test]
    fn serializes_as_a_map() {
        let p = PerFamily::new(|f| f == Family::Ipv6);
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(j, r#"{"ipv4":false,"ipv6":true}"#);
        let back: PerFamily<bool> = serde_json::from_str(&j).unwrap();
        assert_eq!(back, p);
        let partial: PerFamily<u32> = serde_json::from_str(r#"{"ipv6":3}"#).unwrap();
        assert_eq!((partial[Family::Ipv4], partial[Family::Ipv6]), (0, 3));
    }
}
