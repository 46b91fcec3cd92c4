//! Following a job from the client side without losing its first signals.
//!
//! `Chunk` and `Finished` may be sent before the reply to `Generate` arrives, so a client must
//! be subscribed before it calls: [`JobSignals::subscribe`] adds the match rule (signals of the
//! Job interface from the service's unique name), then the caller calls `Generate` on
//! [`JobSignals::service`], then reads [`JobSignals::next`] for the returned path. Signals of
//! other jobs are skipped; signals from any other sender never match.
use futures_util::StreamExt;
use zbus::message::Type as MessageType;
use zbus::names::{BusName, OwnedUniqueName};
use zbus::zvariant::ObjectPath;
use zbus::{Connection, MatchRule, MessageStream};

use crate::{Error, BUS_NAME, JOB_INTERFACE, JOB_PATH_PREFIX};

/// One signal of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobSignal {
    Chunk(String),
    Finished { reason: String, error: String },
}

pub struct JobSignals {
    stream: MessageStream,
    service: OwnedUniqueName,
}

impl JobSignals {
    /// Finds the service's current unique name (starting it if it is activatable) and
    /// subscribes to its job signals.
    pub async fn subscribe(conn: &Connection) -> Result<JobSignals, Error> {
        let dbus = zbus::fdo::DBusProxy::new(conn).await?;
        let name = BusName::try_from(BUS_NAME).map_err(zbus::Error::from)?;
        let service = match dbus.get_name_owner(name.clone()).await {
            Ok(owner) => owner,
            Err(zbus::fdo::Error::NameHasNoOwner(_)) => {
                // Not running: bus activation, when a service file exists, starts it.
                dbus.start_service_by_name(BUS_NAME.try_into().map_err(zbus::Error::from)?, 0).await?;
                dbus.get_name_owner(name).await?
            }
            Err(e) => return Err(zbus::Error::from(e).into()),
        };
        let rule = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender(service.clone())?
            .interface(JOB_INTERFACE)?
            .path_namespace(JOB_PATH_PREFIX)?
            .build();
        let stream = MessageStream::for_match_rule(rule, conn, Some(4096)).await?;
        Ok(JobSignals { stream, service })
    }

    /// The service's unique name: call `Generate` on it, so the job comes from the sender the
    /// match rule names.
    pub fn service(&self) -> &OwnedUniqueName {
        &self.service
    }

    /// The next signal of `job`; `None` when the connection closed.
    pub async fn next(&mut self, job: &ObjectPath<'_>) -> Option<JobSignal> {
        while let Some(msg) = self.stream.next().await {
            let Ok(msg) = msg else { continue };
            let header = msg.header();
            if header.path() != Some(job) || header.sender().map(|s| s.as_str()) != Some(self.service.as_str()) {
                continue;
            }
            let signal = match header.member().map(|m| m.as_str()) {
                Some("Chunk") => msg.body().deserialize::<String>().ok().map(JobSignal::Chunk),
                Some("Finished") => msg
                    .body()
                    .deserialize::<(String, String)>()
                    .ok()
                    .map(|(reason, error)| JobSignal::Finished { reason, error }),
                _ => None,
            };
            if signal.is_some() {
                return signal;
            }
        }
        None
    }
}
