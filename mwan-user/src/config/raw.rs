//! The config file as serde reads it: one struct per table, one field per
//! key, named as the key (no `rename`: `error::key!` relies on it). Unknown
//! keys are refused (`deny_unknown_fields`); each value is kept with its
//! place in the text ([`Setting`]) and must have its shape (shape.rs).
//! What values mean is validation's (validate.rs): nothing is interpreted
//! here.
//!
//! A key is added by one field here; validation reads it.

use std::ops::Range;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::error::{self, ConfigError, Problem};
use super::shape::{Bool, Choice, Described, Float, Int, IntOrStr, List, OneOrMany, Str, Tables};
use super::types::{AllDown, Failback, QuotaAction, Sticky, StickyKey};

/// A key of a table: absent, or its value and where it is written.
pub(super) struct Setting<T>(Option<Spanned<T>>);

impl<T> Setting<T> {
    pub(super) fn get(&self) -> Option<&Spanned<T>> {
        self.0.as_ref()
    }

    pub(super) fn is_some(&self) -> bool {
        self.0.is_some()
    }

    pub(super) fn span(&self) -> Option<Range<usize>> {
        self.0.as_ref().map(Spanned::span)
    }

    /// The value read by `read`, if the key is set.
    pub(super) fn read<U>(
        &self,
        read: impl FnOnce(&Spanned<T>) -> Result<U, Problem>,
    ) -> Result<Option<U>, Problem> {
        self.0.as_ref().map(read).transpose()
    }

    /// This setting if it is set, else `other` (a WAN's own key over the
    /// top level's).
    pub(super) fn or<'a>(&'a self, other: &'a Setting<T>) -> &'a Setting<T> {
        if self.is_some() {
            self
        } else {
            other
        }
    }
}

impl<E: Copy> Setting<Choice<E>> {
    pub(super) fn choice(&self) -> Option<E> {
        self.0.as_ref().map(|c| c.get_ref().0)
    }
}

impl Setting<Bool> {
    pub(super) fn flag(&self) -> Option<bool> {
        self.0.as_ref().map(|b| b.get_ref().0)
    }
}

/// An absent key is `None` (serde asks for an option when it is missing).
impl<'de, T: Deserialize<'de>> Deserialize<'de> for Setting<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<Spanned<T>>::deserialize(d).map(Setting)
    }
}

/// What string (and list) settings are for, and so what a value of the
/// wrong type must be: `Str<kind::Duration>`.
pub(super) mod kind {
    use super::Described;

    macro_rules! kinds {
        ($($(#[$m:meta])* $name:ident = $what:literal,)*) => {$(
            $(#[$m])*
            pub(in super::super) enum $name {}
            impl Described for $name {
                const EXPECTING: &'static str = $what;
            }
        )*};
    }

    kinds! {
        Name = "a string",
        Interface = "an interface name",
        Interfaces = "a list of interface names",
        Duration = "a duration such as \"5s\"",
        Path = "a path",
        Command = "a command (a string)",
        Listen = "an address and port (a string)",
        Ipv4 = "an IPv4 address (a string)",
        Gateway = "an IPv4 address or \"auto\"",
        Gateway6 = "an IPv6 address or \"auto\"",
        Ipv6Mode = "\"nat\", \"npt\" or \"off\"",
        Prefix6 = "an IPv6 prefix such as \"2001:db8:1::/48\" or \"auto\"",
        LanPrefix6 = "an IPv6 prefix such as \"fd00:1::/48\"",
        Targets = "a list of targets such as [\"198.51.100.1\", \"tcp:203.0.113.9:443\"]",
        Percent = "a number (percent)",
        MarkMask = "an integer or a string such as \"0x00ff0000\"",
        Ports = "a list of ports and ranges such as [25, \"8000-8100\"]",
        Strings = "a string or a list of strings",
        Domains = "a domain name or a list of them",
        WanNames = "a list of WAN names",
        Size = "a size such as \"50GB\" or \"500MB\"",
        ResetDay = "a day of the month (1 to 31), of the week (\"Mon\") or \"daily\"",
        Percents = "a list of percentages such as [75, 95]",
        Schedule = "a schedule such as \"Mon-Fri 08:00-18:00\" (or a list of them)",
    }
}

/// Declares the health-check keys, allowed at the top level (every WAN's
/// defaults) and in each `[[wan]]` (that WAN's own), by handing them to
/// macro `$then` after `$args`.
macro_rules! health_keys {
    ($then:ident! { $($args:tt)* }) => {
        $then! { $($args)* ;
            probe_targets: List<Str<kind::Targets>>,
            probe_interval: Str<kind::Duration>,
            probe_timeout: Str<kind::Duration>,
            quorum: Int,
            down_after: Int,
            up_after: Int,
            hold_down: Str<kind::Duration>,
            max_loss: Float<kind::Percent>,
            max_rtt: Str<kind::Duration>,
            health_window: Int,
            passive: Bool,
            passive_timeout: Str<kind::Duration>,
            passive_destinations: Int,
        }
    };
}

/// [`Health`]: the health keys of one table.
macro_rules! health_struct {
    (; $($key:ident: $ty:ty,)*) => {
        /// The health-check keys of one table (see `health_keys!`).
        pub(super) struct Health<'a> {
            $(pub(super) $key: &'a Setting<$ty>,)*
        }

        impl<'a> Health<'a> {
            /// Each key of this table, else of `defaults`.
            pub(super) fn or(&self, defaults: &Health<'a>) -> Health<'a> {
                Health { $($key: self.$key.or(defaults.$key),)* }
            }
        }
    };
}

/// A table with its own keys and the health keys.
macro_rules! table_with_health {
    (
        $(#[$m:meta])* struct $name:ident { $($(#[$fm:meta])* $key:ident: $ty:ty,)* } ;
        $($hkey:ident: $hty:ty,)*
    ) => {
        $(#[$m])*
        pub(super) struct $name {
            $($(#[$fm])* pub(super) $key: $ty,)*
            $(pub(super) $hkey: Setting<$hty>,)*
        }

        impl $name {
            pub(super) fn health(&self) -> Health<'_> {
                Health { $($hkey: &self.$hkey,)* }
            }
        }
    };
}

health_keys!(health_struct! {});

health_keys!(table_with_health! {
    /// The top level.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawConfig {
        lan_interfaces: Setting<List<Str<kind::Interfaces>>>,
        sticky: Setting<Choice<Sticky>>,
        sticky_key: Setting<Choice<StickyKey>>,
        host_ttl: Setting<Str<kind::Duration>>,
        domain_ttl_floor: Setting<Str<kind::Duration>>,
        domain_ttl_grace: Setting<Str<kind::Duration>>,
        pin_dir: Setting<Str<kind::Path>>,
        state_dir: Setting<Str<kind::Path>>,
        max_flows: Setting<Int>,
        max_hosts: Setting<Int>,
        mark_mask: Setting<IntOrStr<kind::MarkMask>>,
        table_base: Setting<Int>,
        rule_priority: Setting<Int>,
        all_down: Setting<Choice<AllDown>>,
        failback: Setting<Choice<Failback>>,
        failback_after: Setting<Str<kind::Duration>>,
        failback_spread: Setting<Str<kind::Duration>>,
        drain_pinned_hosts: Setting<Bool>,
        max_backup_flow_age: Setting<Str<kind::Duration>>,
        usage_file: Setting<Str<kind::Path>>,
        on_change: Setting<Str<kind::Command>>,
        hook_timeout: Setting<Str<kind::Duration>>,
        metrics_listen: Setting<Str<kind::Listen>>,
        ha_address: Setting<Str<kind::Ipv4>>,
        #[serde(default)]
        wan: Tables<RawWan>,
        #[serde(default)]
        rule: Tables<RawRule>,
    }
});

health_keys!(table_with_health! {
    /// A `[[wan]]`.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, expecting = "a table")]
    struct RawWan {
        name: Setting<Str<kind::Name>>,
        interface: Setting<Str<kind::Interface>>,
        gateway: Setting<Str<kind::Gateway>>,
        weight: Setting<Int>,
        tier: Setting<Int>,
        nat: Setting<Bool>,
        snat_address: Setting<Str<kind::Ipv4>>,
        id: Setting<Int>,
        enabled: Setting<Bool>,
        gateway6: Setting<Str<kind::Gateway6>>,
        ipv6: Setting<Str<kind::Ipv6Mode>>,
        prefix6: Setting<Str<kind::Prefix6>>,
        lan_prefix6: Setting<Str<kind::LanPrefix6>>,
        quota: Setting<Str<kind::Size>>,
        quota_reset_day: Setting<IntOrStr<kind::ResetDay>>,
        quota_warn: Setting<List<Int<kind::Percents>>>,
        quota_action: Setting<Choice<QuotaAction>>,
        quota_reset_flows: Setting<Bool>,
        failback: Setting<Choice<Failback>>,
        failback_after: Setting<Str<kind::Duration>>,
        max_backup_flow_age: Setting<Str<kind::Duration>>,
        #[serde(default)]
        weight_schedule: Tables<RawWeightSchedule>,
    }
});

/// A `[[wan.weight_schedule]]`: a weight while a schedule is on.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawWeightSchedule {
    pub(super) schedule: Setting<OneOrMany<Str<kind::Schedule>>>,
    pub(super) weight: Setting<Int>,
}

/// A `[[rule]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawRule {
    pub(super) name: Setting<Str<kind::Name>>,
    pub(super) proto: Setting<OneOrMany<Str<kind::Strings>>>,
    pub(super) src: Setting<OneOrMany<Str<kind::Strings>>>,
    pub(super) dst: Setting<OneOrMany<Str<kind::Strings>>>,
    pub(super) src_ports: Setting<List<IntOrStr<kind::Ports>>>,
    pub(super) dst_ports: Setting<List<IntOrStr<kind::Ports>>>,
    pub(super) lan_interface: Setting<OneOrMany<Str<kind::Strings>>>,
    pub(super) domains: Setting<OneOrMany<Str<kind::Domains>>>,
    pub(super) domains_file: Setting<Str<kind::Path>>,
    pub(super) wans: Setting<List<Str<kind::WanNames>>>,
    pub(super) balance: Setting<List<Str<kind::WanNames>>>,
    pub(super) main: Setting<Bool>,
    pub(super) schedule: Setting<OneOrMany<Str<kind::Schedule>>>,
}

impl RawConfig {
    /// Reads config text: TOML syntax, the tables' keys and the values'
    /// shapes. Errors carry the line and key.
    pub(super) fn read(text: &str) -> Result<RawConfig, ConfigError> {
        // toml_edit tells where a syntax error is.
        toml_edit::ImDocument::parse(text).map_err(|e| error::syntax(&e, text))?;
        toml::from_str(text).map_err(|e| error::from_serde(&e, text))
    }
}
