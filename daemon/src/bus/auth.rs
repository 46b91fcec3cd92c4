//! Who may load, unload and pull models, or calibrate: on the session bus the user fasad runs
//! as; on the system bus root, or whoever polkit authorizes for `dev.fasa.Fasa1.manage-models`
//! (root only when polkit is not on the bus).
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use fasa_dbus::{Error, MANAGE_MODELS_ACTION};
use zbus::message::Header;
use zbus::names::BusName;
use zbus::zvariant::{Type, Value};
use zbus::Connection;

use crate::config::BusKind;

const POLKIT: &str = "org.freedesktop.PolicyKit1";

#[derive(Debug, serde::Deserialize, Type)]
struct AuthorizationResult {
    is_authorized: bool,
    _is_challenge: bool,
    _details: HashMap<String, String>,
}

/// Ok when the caller may `what` (e.g. "load a model"); else `NotPermitted` saying how.
pub async fn authorize(conn: &Connection, header: &Header<'_>, bus: BusKind, what: &str) -> Result<(), Error> {
    let sender = header.sender().ok_or_else(|| Error::NotPermitted(format!("a caller without a bus name may not {what}")))?;
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let uid = dbus.get_connection_unix_user(BusName::Unique(sender.clone())).await?;
    let own = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    if uid == 0 || (bus == BusKind::Session && uid == own) {
        return Ok(());
    }
    if bus == BusKind::Session {
        return Err(Error::NotPermitted(format!("only the user fasad runs as (uid {own}) may {what} on the session bus")));
    }
    let polkit = BusName::try_from(POLKIT).map_err(zbus::Error::from)?;
    if !dbus.name_has_owner(polkit).await.unwrap_or(false) {
        return Err(Error::NotPermitted(format!("only root may {what} (polkit is not running to authorize others)")));
    }
    let subject: (&str, HashMap<&str, Value<'_>>) = ("system-bus-name", HashMap::from([("name", Value::from(sender.as_str()))]));
    let details: HashMap<&str, &str> = HashMap::new();
    // Flag 1: allow interaction (an authentication agent may ask for a password).
    let reply = conn
        .call_method(Some(POLKIT), "/org/freedesktop/PolicyKit1/Authority", Some("org.freedesktop.PolicyKit1.Authority"), "CheckAuthorization", &(subject, MANAGE_MODELS_ACTION, details, 1u32, ""))
        .await
        .map_err(|e| Error::NotPermitted(format!("polkit could not check whether you may {what}: {e}")))?;
    let result: AuthorizationResult = reply.body().deserialize().map_err(|e| Error::Failed(format!("polkit's answer: {e}")))?;
    if result.is_authorized {
        Ok(())
    } else {
        Err(Error::NotPermitted(format!("polkit does not authorize you to {what} (action {MANAGE_MODELS_ACTION}); ask an administrator")))
    }
}
