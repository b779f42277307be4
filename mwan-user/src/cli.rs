//! The `mwan` command line, as clap declares it: the binary parses it, and
//! `cargo xtask deb` renders it as man pages and shell completions (this
//! file depends on clap and std alone, so xtask compiles it by path without
//! the daemon).

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// The config file the daemon and every command read by default.
pub const DEFAULT_CONFIG: &str = "/etc/mwan/mwan.toml";

/// Exit codes (docs/CLI.md; the man page's EXIT STATUS).
pub mod exit {
    pub const FAILURE: u8 = 1;
    pub const NOT_RUNNING: u8 = 3;
    pub const SOME_DOWN: u8 = 4;
    pub const ALL_DOWN: u8 = 5;
    pub const DENIED: u8 = 6;

    /// Every exit code and what it means.
    pub const MEANINGS: [(u8, &str); 7] = [
        (0, "success; for status: every enabled WAN is up"),
        (
            FAILURE,
            "failure: an invalid config, the daemon refused, a netlink or BPF error",
        ),
        (2, "command-line usage error"),
        (
            NOT_RUNNING,
            "the daemon is not running (no socket, a stale one, or no answer)",
        ),
        (SOME_DOWN, "status: some enabled WAN is not up"),
        (ALL_DOWN, "status: no WAN is up"),
        (
            DENIED,
            "permission denied on the control socket (root only): run as root",
        ),
    ];
}

#[derive(Parser)]
#[command(
    name = "mwan",
    version,
    about = "Multi-WAN load balancing and failover with an eBPF datapath",
    long_about = "Multi-WAN load balancing and failover with an eBPF datapath.\n\n\
        `mwan run` is the daemon (mwan.service): it attaches a tc classifier to the LAN \
        interfaces that pins every connection to one uplink, probes every uplink through \
        itself and moves connections off a dead one. The other commands ask the running \
        daemon (status, reload, drain...) or read its pinned maps (flows, hosts). The \
        config is described in docs/CONFIG.md (installed as \
        /usr/share/doc/mwan/CONFIG.md.gz) and commented in the example /etc/mwan/mwan.toml."
)]
pub struct Cli {
    /// The config file (also tells the CLI where the daemon's socket and pins are).
    #[arg(short, long, global = true, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Talk to the daemon on this socket instead of the config's.
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the daemon in the foreground.
    Run {
        /// On SIGTERM/SIGINT leave the datapath running (for restarts and
        /// upgrades); by default everything mwan added is removed.
        #[arg(long)]
        keep: bool,
    },
    /// Validate the config (syntax, values, interfaces); exit 0 or 1.
    Check,
    /// WAN states, shares, health and counters.
    Status {
        /// Print JSON instead of a table (the fields are in docs/CLI.md).
        #[arg(long)]
        json: bool,
    },
    /// Pinned flows (read from the pinned maps; works without the daemon).
    Flows {
        /// Print JSON instead of a table (the fields are in docs/CLI.md).
        #[arg(long)]
        json: bool,
        /// Only flows pinned to this WAN ("main" for unbalanced flows).
        #[arg(long)]
        wan: Option<String>,
        /// Only flows from this LAN address (IPv4 or IPv6).
        #[arg(long)]
        host: Option<IpAddr>,
        /// At most this many flows (after sorting).
        #[arg(long)]
        limit: Option<usize>,
        /// The order of the list.
        #[arg(long, value_enum, default_value_t = FlowSort::Recent)]
        sort: FlowSort,
    },
    /// Per-host pins (sticky = "host").
    Hosts {
        /// Print JSON instead of a table (the fields are in docs/CLI.md).
        #[arg(long)]
        json: bool,
    },
    /// Addresses learned from DNS answers for rules by domain name.
    Domains {
        /// Print JSON instead of a table (the fields are in docs/CLI.md).
        #[arg(long)]
        json: bool,
        /// Only names equal to this domain or under it.
        #[arg(long)]
        name: Option<String>,
    },
    /// Change a WAN's weight at once (new flows only; until reload).
    SetWeight {
        /// The WAN's name.
        wan: String,
        /// Its new weight, 1 to 1000.
        weight: u32,
    },
    /// No new flows through a WAN; its existing flows stay.
    Drain {
        /// The WAN's name.
        wan: String,
    },
    /// Undo `drain` and `disable`.
    Enable {
        /// The WAN's name.
        wan: String,
    },
    /// Take a WAN out completely: its flows move to other WANs.
    Disable {
        /// The WAN's name.
        wan: String,
    },
    /// Re-read the config (same as SIGHUP); an invalid config is refused.
    Reload,
    /// Stop the daemon. The datapath keeps forwarding (restart/upgrade)
    /// unless --teardown, which removes everything mwan added (also when
    /// no daemon runs).
    Stop {
        /// Remove every rule, route, table, filter and pin mwan added.
        #[arg(long)]
        teardown: bool,
    },
    /// Install this binary (as /usr/local/sbin/mwan), the systemd unit and an
    /// example config: a source install (the Debian package does this itself).
    Install {
        /// Install under this directory instead of / (to read the files
        /// first, or to stage them).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Also install an HA pair's keepalived and conntrackd configs
        /// (commented examples) and mwan's notify and track scripts.
        #[arg(long)]
        ha: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FlowSort {
    /// Most recently active first.
    Recent,
    /// Most bytes first.
    Bytes,
    /// Oldest first.
    Age,
}
