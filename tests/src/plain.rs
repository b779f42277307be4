//! Plain kernel routing on the router, for testing the lab without mwan:
//! masquerade on every WAN and one ISP as the default route.

use anyhow::{Context, Result};

use crate::impair::{replace_table, replace_table6};
use crate::topology::Lab;
use crate::{lock, sys};

/// Metric of the plain-routing default route: below every `proto dhcp`
/// route (100 + I).
const PLAIN_METRIC: u32 = 10;

impl Lab {
    /// Routes the router's forwarded traffic through ISP `isp`: masquerade
    /// on `wan*` (nft table `ip lab`) and a `proto static` default route
    /// via that ISP with metric 10. The router's conntrack table is flushed
    /// so no NAT binding to the previous ISP lingers. Follows the ISP
    /// through [`crate::Isp::readdress`] and interface removal/restore.
    ///
    /// In a dual-stack lab the same for IPv6: NAT66 (masquerade in table
    /// `ip6 lab`) and a default route via the ISP's global address, metric
    /// 10 (below the RA routes) — the baseline IPv6 router.
    pub fn plain_routing_via(&self, isp: usize) -> Result<()> {
        let gateway = self.isp(isp).gateway();
        let mut via = lock(&self.plain_via);
        self.router.nft(&replace_table(
            "nat hook postrouting",
            "oifname \"wan*\" masquerade\n",
        ))?;
        if self.is_dual_stack() {
            self.router.nft(&replace_table6(
                "nat hook postrouting",
                "oifname \"wan*\" masquerade\n",
            ))?;
        }
        *via = Some(isp);
        self.router.ip(&self.plain_routes(isp, gateway))?;
        self.router
            .run(sys::flush_conntrack)
            .context("flushing the router's conntrack table")
    }

    /// Undoes [`Lab::plain_routing_via`].
    pub fn clear_plain_routing(&self) -> Result<()> {
        self.remove_plain_routing()?;
        self.router
            .run(sys::flush_conntrack)
            .context("flushing the router's conntrack table")
    }

    /// Removes the route and the masquerade rule of
    /// [`Lab::plain_routing_via`] but keeps the conntrack table: the
    /// connections made meanwhile live on with their NAT bindings, as when
    /// an admin replaces hand-made rules by mwan.
    pub fn remove_plain_routing(&self) -> Result<()> {
        let mut via = lock(&self.plain_via);
        if via.take().is_some() {
            // The route is already gone if its interface was removed.
            let _ = self
                .router
                .ip(&format!("route del default metric {PLAIN_METRIC}"));
            if self.is_dual_stack() {
                let _ = self
                    .router
                    .ip(&format!("route del ::/0 metric {PLAIN_METRIC}"));
            }
        }
        if self.is_dual_stack() {
            self.router
                .nft(&replace_table6("nat hook postrouting", ""))?;
        }
        self.router.nft(&replace_table("nat hook postrouting", ""))
    }

    /// Re-installs the plain-routing route if it goes through ISP `isp`
    /// (after its gateway changed or its interface came back).
    pub(crate) fn refresh_plain_route(&self, isp: usize) -> Result<()> {
        let via = lock(&self.plain_via);
        if *via == Some(isp) {
            self.router
                .ip(&self.plain_routes(isp, self.isp(isp).gateway()))?;
        }
        Ok(())
    }

    /// The plain-routing default route(s) via ISP `isp`, as `ip` commands.
    fn plain_routes(&self, isp: usize, gateway: std::net::Ipv4Addr) -> String {
        let mut cmds = format!(
            "route replace default via {gateway} dev wan{isp} proto static metric {PLAIN_METRIC}\n"
        );
        if self.is_dual_stack() {
            cmds += &format!(
                "route replace ::/0 via {} dev wan{isp} proto static metric {PLAIN_METRIC}\n",
                self.isp(isp).gateway6()
            );
        }
        cmds
    }
}
