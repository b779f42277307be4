//! The control socket: requests from the `mwan` CLI, each answered after
//! the daemon has acted on it. A command changes an input (a WAN's weight,
//! drain, enabled state; the config on reload) and reconciles.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tracing::info;

use super::{Daemon, Exit};
use crate::control::{Request, Response};

impl Daemon {
    pub(super) async fn handle(&mut self, req: Request) -> (Response, Option<Exit>) {
        if let Request::Stop { teardown } = req {
            return if teardown {
                (
                    Response::ok("stopping and removing the datapath"),
                    Some(Exit::Teardown),
                )
            } else {
                (
                    Response::ok("stopping; the datapath keeps forwarding"),
                    Some(Exit::Keep),
                )
            };
        }
        match self.command(req).await {
            Ok(r) => (r, None),
            Err(e) => (Response::error(format!("{e:#}")), None),
        }
    }

    async fn command(&mut self, req: Request) -> Result<Response> {
        Ok(match req {
            Request::Status => {
                let mut r = Response::ok("status");
                r.status = Some(self.status().await?);
                r
            }
            Request::Domains { name } => {
                let rule_names: Vec<String> =
                    self.cfg.rules.iter().map(|r| r.name.clone()).collect();
                let relay = self.applied.relay();
                let entries = match relay {
                    Some(r) => r.learned(&rule_names, name.as_deref()),
                    None => vec![],
                };
                let mut r = Response::ok(match relay {
                    Some(_) if entries.is_empty() => "nothing learned (yet)",
                    Some(_) => "learned addresses",
                    None => "no rule has domains: nothing is learned",
                });
                r.domains = Some(entries);
                r
            }
            Request::SetWeight { wan, weight } => {
                if !(1..=1000).contains(&weight) {
                    bail!("weight {weight} is out of range 1..=1000");
                }
                let i = self.wan_index(&wan)?;
                let old = self.wans[i]
                    .weight_at(crate::clock::LocalTime::now().week_secs())
                    .0;
                self.wans[i].weight_override = Some(weight);
                info!(wan = %wan, old, new = weight, "weight changed");
                self.reconcile(false).await?;
                Response::ok(format!("{wan}: weight {old} -> {weight} (new flows only)"))
            }
            Request::Drain { wan } => {
                let i = self.wan_index(&wan)?;
                self.wans[i].drained = true;
                info!(wan = %wan, "drained: no new flows, existing flows stay");
                self.reconcile(false).await?;
                Response::ok(format!(
                    "{wan}: drained (no new flows; existing flows stay)"
                ))
            }
            Request::Enable { wan } => {
                let i = self.wan_index(&wan)?;
                self.wans[i].drained = false;
                let ts = self.wans[i].set_disabled(false, Instant::now());
                self.record(i, ts);
                self.reconcile(false).await?;
                Response::ok(format!("{wan}: enabled"))
            }
            Request::Disable { wan } => {
                let i = self.wan_index(&wan)?;
                let ts = self.wans[i].set_disabled(true, Instant::now());
                self.record(i, ts);
                self.reconcile(false).await?;
                Response::ok(format!("{wan}: disabled (its flows move to other WANs)"))
            }
            Request::Reload => Response::ok(self.reload().await?),
            Request::Stop { .. } => unreachable!("handled by handle()"),
        })
    }

    fn wan_index(&self, name: &str) -> Result<usize> {
        self.wans
            .iter()
            .position(|w| w.cfg.name == name)
            .ok_or_else(|| {
                anyhow!(
                    "no WAN is named `{name}` (known: {})",
                    self.wans
                        .iter()
                        .map(|w| w.cfg.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

pub fn bind_control(socket: &Path) -> Result<UnixListener> {
    if socket.exists() {
        // A live daemon would hold the pin-dir lock, so this is stale.
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale {}", socket.display()))?;
    }
    let l = UnixListener::bind(socket)
        .with_context(|| format!("binding control socket {}", socket.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// The daemon's answer to one control request; `written` is told once it
/// has been written to the connection.
pub struct Reply {
    pub resp: Response,
    pub written: Option<oneshot::Sender<()>>,
}

pub async fn accept_loop(
    listener: UnixListener,
    tx: mpsc::Sender<(Request, oneshot::Sender<Reply>)>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => {
                        let (rtx, rrx) = oneshot::channel();
                        if tx.send((req, rtx)).await.is_err() {
                            return;
                        }
                        rrx.await.unwrap_or_else(|_| Reply {
                            resp: Response::error("daemon stopping"),
                            written: None,
                        })
                    }
                    Err(e) => Reply {
                        resp: Response::error(format!("bad request: {e}")),
                        written: None,
                    },
                };
                let mut out = serde_json::to_string(&reply.resp).unwrap_or_default();
                out.push('\n');
                let ok = wr.write_all(out.as_bytes()).await.is_ok();
                if let Some(w) = reply.written {
                    let _ = w.send(());
                }
                if !ok {
                    return;
                }
            }
        });
    }
}
