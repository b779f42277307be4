//! DNS pieces for rules by domain name (`domains`, `domains_file`).
//!
//! mwan learns the addresses of the names a rule lists from the DNS answers
//! LAN clients receive, and steers connections to them (see "Domain rules"
//! in docs/ARCHITECTURE.md). The pure parts: the answer parser ([`wire`]),
//! the TCP framing of DNS ([`tcp`]), the name syntax of the config
//! ([`name`]), the first-rule suffix matcher ([`suffix`]) and the table of
//! learned addresses with their expiry ([`learned`]), whose changes go into
//! the datapath's `DOMAIN_DST`; all bounded: any input, however malformed,
//! is refused or ignored, never a panic. The packet path: the relay
//! ([`relay`]) that LAN queries are diverted to.
pub mod learned;
pub mod name;
pub mod relay;
pub mod suffix;
pub mod tcp;
pub mod wire;

pub use learned::AddressTable;
pub use name::{config_name, NameError};
pub use suffix::DomainMatcher;
pub use tcp::{frame, Deframer};
pub use wire::{parse_response, Learned, Response, WireError};
