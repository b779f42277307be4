//! Plain values for structured log fields.
//!
//! A field given to `tracing` with `?` prints its `Debug` form, so an
//! `Option` reads `rtt_ms=Some(4.1)` or `rtt_ms=None`. tracing records an
//! `Option` of a field value as the value when present and leaves the field
//! out when absent: pass optional numbers as they are and anything else
//! (strings too, which would otherwise be quoted) through [`shown`].

use std::fmt;

use tracing::field::{display, DisplayValue};

/// An optional field printed by its `Display` form (`address=100.64.1.2/24`),
/// left out of the line when absent.
pub fn shown<T: fmt::Display>(v: Option<T>) -> Option<DisplayValue<T>> {
    v.map(display)
}

/// An optional time in milliseconds, to two decimals (`rtt_ms=4.79`), left
/// out when absent.
pub fn millis(v: Option<f64>) -> Option<DisplayValue<String>> {
    shown(v.map(|v| format!("{v:.2}")))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::Ipv4Addr;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Formats one event with the daemon's log format and returns the line.
    fn logged(event: impl FnOnce()) -> String {
        #[derive(Clone)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf(Arc::new(Mutex::new(Vec::new())));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_target(false)
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, event);
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn present_values_print_plain_and_absent_ones_are_left_out() {
        let addr: Option<Ipv4Addr> = Some(Ipv4Addr::new(100, 64, 1, 2));
        let rtt: Option<f64> = Some(4.1);
        let line = logged(|| {
            tracing::info!(
                rtt_ms = rtt,
                jitter_ms = None::<f64>,
                address = shown(addr),
                gateway = shown(None::<Ipv4Addr>),
                "wan state changed"
            )
        });
        assert!(line.contains("rtt_ms=4.1"), "{line}");
        assert!(line.contains("address=100.64.1.2"), "{line}");
        assert!(
            !line.contains("jitter_ms") && !line.contains("gateway"),
            "{line}"
        );
        assert!(!line.contains("Some(") && !line.contains("None"), "{line}");
    }
}
