//! Finding fasad: on the bus the user named, else on the system bus when fasad is there (or can
//! be activated there), else on the session bus.
use fasa_dbus::BUS_NAME;
use zbus::names::BusName;
use zbus::Connection;

use crate::Failure;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    Session,
    System,
}

impl Bus {
    pub fn as_str(self) -> &'static str {
        match self {
            Bus::Session => "session",
            Bus::System => "system",
        }
    }
}

/// A connection to the bus where fasad is (or can be started), or `Failure::NotRunning`.
pub async fn connect(choice: Option<Bus>) -> Result<(Connection, Bus), Failure> {
    match choice {
        Some(bus) => {
            let conn = open(bus).await.ok_or(Failure::NotRunning(Some(bus)))?;
            if !reachable(&conn).await {
                return Err(Failure::NotRunning(Some(bus)));
            }
            Ok((conn, bus))
        }
        None => {
            if let Some(conn) = open(Bus::System).await {
                if reachable(&conn).await {
                    return Ok((conn, Bus::System));
                }
            }
            match open(Bus::Session).await {
                Some(conn) if reachable(&conn).await => Ok((conn, Bus::Session)),
                _ => Err(Failure::NotRunning(None)),
            }
        }
    }
}

async fn open(bus: Bus) -> Option<Connection> {
    match bus {
        Bus::Session => Connection::session().await.ok(),
        Bus::System => Connection::system().await.ok(),
    }
}

/// fasad owns its name on this bus, or the bus can start it.
async fn reachable(conn: &Connection) -> bool {
    let Ok(dbus) = zbus::fdo::DBusProxy::new(conn).await else { return false };
    let Ok(name) = BusName::try_from(BUS_NAME) else { return false };
    if dbus.name_has_owner(name).await.unwrap_or(false) {
        return true;
    }
    dbus.list_activatable_names().await.map(|names| names.iter().any(|n| n.as_str() == BUS_NAME)).unwrap_or(false)
}
