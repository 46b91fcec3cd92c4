//! fasa-dbus: bus, object and interface names, shared types, and client proxies of fasad.
//!
//! Both `fasad` (the service) and `fasactl` (a client) depend on this crate, so a name or an
//! option is spelt once. The interfaces as served are checked in as
//! `interfaces/dev.fasa.Fasa1.xml` ([`INTROSPECTION_XML`]); tests keep the two equal.
pub mod client;
pub mod error;
pub mod names;
pub mod options;
pub mod proxy;
pub mod types;

pub use client::{JobSignal, JobSignals};
pub use error::{Error, Result};
pub use names::*;
pub use options::{GenerateOptions, OPTION_NAMES};
pub use proxy::{JobProxy, ManagerProxy, TaskProxy};
pub use types::{FinishReason, JobState, SHAPE_KEYS};

/// The introspection data of `dev.fasa.Fasa1.Manager`, `.Job` and `.Task`, as fasad serves it.
pub const INTROSPECTION_XML: &str = include_str!("../interfaces/dev.fasa.Fasa1.xml");

/// The `<interface name="…">…</interface>` elements of an introspection document whose name
/// starts with `prefix`, each with whitespace between tags removed and sorted by name, so that
/// two documents can be compared regardless of indentation and of the standard interfaces.
pub fn interface_elements(xml: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = xml;
    let open = format!("<interface name=\"{prefix}");
    while let Some(start) = rest.find(&open) {
        let Some(len) = rest[start..].find("</interface>") else { break };
        let end = start + len + "</interface>".len();
        let element: String = rest[start..end]
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("");
        out.push(element);
        rest = &rest[end..];
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_xml_has_both_interfaces() {
        let elements = interface_elements(INTROSPECTION_XML, "dev.fasa.Fasa1.");
        assert_eq!(elements.len(), 3, "{elements:#?}");
        assert!(elements[0].starts_with(&format!("<interface name=\"{JOB_INTERFACE}\"")));
        assert!(elements[1].starts_with(&format!("<interface name=\"{MANAGER_INTERFACE}\"")));
        assert!(elements[2].starts_with(&format!("<interface name=\"{TASK_INTERFACE}\"")));
    }

    #[test]
    fn interface_elements_ignore_layout() {
        let a = "<node>\n  <interface name=\"x.A\">\n    <method name=\"M\"/>\n  </interface>\n</node>";
        let b = "<node><interface name=\"x.A\"><method name=\"M\"/></interface><interface name=\"y.B\"></interface></node>";
        assert_eq!(interface_elements(a, "x."), interface_elements(b, "x."));
    }
}
