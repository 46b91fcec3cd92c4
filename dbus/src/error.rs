//! Typed D-Bus errors, `dev.fasa.Fasa1.Error.<Variant>`, shared by the service (which replies
//! with them) and clients (whose proxy calls return them). Each carries a message a person can
//! act on.
use zbus::DBusError;

#[derive(Debug, DBusError)]
#[zbus(prefix = "dev.fasa.Fasa1.Error")]
pub enum Error {
    /// A transport or protocol error, or an error name this crate does not know.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// An argument or option is malformed, unknown or out of range.
    InvalidArgument(String),
    /// The prompt plus `max_tokens` does not fit the model's context.
    ContextTooLong(String),
    /// Every cache slot is in use and the queue is full: retry later.
    Busy(String),
    /// No model is loaded.
    ModelNotLoaded(String),
    /// The job was cancelled.
    Cancelled(String),
    /// No memory plan fits the request (or any request): the message says what would.
    DoesNotFit(String),
    /// The caller may not do this (e.g. touch another caller's job).
    NotPermitted(String),
    /// Anything else that went wrong in the service.
    Failed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<zbus::fdo::Error> for Error {
    fn from(e: zbus::fdo::Error) -> Self {
        zbus::Error::from(e).into()
    }
}

impl Error {
    /// The human-readable part (the D-Bus error message), without the error name.
    pub fn message(&self) -> String {
        match self {
            Error::ZBus(zbus::Error::MethodError(_, Some(desc), _)) => desc.clone(),
            Error::ZBus(e) => e.to_string(),
            Error::InvalidArgument(m)
            | Error::ContextTooLong(m)
            | Error::Busy(m)
            | Error::ModelNotLoaded(m)
            | Error::Cancelled(m)
            | Error::NotPermitted(m)
            | Error::DoesNotFit(m)
            | Error::Failed(m) => m.clone(),
        }
    }

    /// The D-Bus error name when the peer answered with an error (typed or not).
    pub fn dbus_name(&self) -> Option<String> {
        match self {
            Error::ZBus(zbus::Error::MethodError(name, _, _)) => Some(name.to_string()),
            Error::ZBus(zbus::Error::FDO(e)) => Some(zbus::DBusError::name(e.as_ref()).to_string()),
            Error::ZBus(_) => None,
            other => Some(zbus::DBusError::name(other).to_string()),
        }
    }

    /// True when the service is simply not there: no owner and not activatable, or gone.
    pub fn is_service_unknown(&self) -> bool {
        matches!(
            self.dbus_name().as_deref(),
            Some("org.freedesktop.DBus.Error.ServiceUnknown" | "org.freedesktop.DBus.Error.NameHasNoOwner")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix() {
        assert_eq!(Error::Busy("x".into()).name().as_str(), "dev.fasa.Fasa1.Error.Busy");
        assert_eq!(Error::InvalidArgument("x".into()).name().as_str(), "dev.fasa.Fasa1.Error.InvalidArgument");
        assert_eq!(Error::NotPermitted("x".into()).name().as_str(), "dev.fasa.Fasa1.Error.NotPermitted");
    }

    #[test]
    fn method_errors_convert_back_to_variants() {
        let name = zbus::names::OwnedErrorName::try_from("dev.fasa.Fasa1.Error.ContextTooLong").unwrap();
        let msg = zbus::message::Message::method_call("/", "M").unwrap().build(&()).unwrap();
        let e: Error = zbus::Error::MethodError(name, Some("too long".into()), msg).into();
        assert!(matches!(&e, Error::ContextTooLong(m) if m == "too long"), "{e:?}");
        assert_eq!(e.message(), "too long");
    }
}
