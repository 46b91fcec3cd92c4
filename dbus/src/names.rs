//! The versioned names fasad uses on the bus (freedesktop API design guide: bus name, interfaces
//! and object paths all end in `1`, so a future `Fasa2` can live beside this one).

/// Well-known bus name of the service.
pub const BUS_NAME: &str = "dev.fasa.Fasa1";
/// The only object at `/`: `org.freedesktop.DBus.ObjectManager`, listing the manager and jobs.
pub const OBJECT_MANAGER_PATH: &str = "/";
/// The manager object: loaded model, counters, `Generate`/`Complete`.
pub const MANAGER_PATH: &str = "/dev/fasa/Fasa1";
pub const MANAGER_INTERFACE: &str = "dev.fasa.Fasa1.Manager";
/// Job objects live at `JOB_PATH_PREFIX/<n>`.
pub const JOB_PATH_PREFIX: &str = "/dev/fasa/Fasa1/Job";
pub const JOB_INTERFACE: &str = "dev.fasa.Fasa1.Job";
/// Typed errors are `ERROR_PREFIX.<Variant>`, see [`crate::Error`].
pub const ERROR_PREFIX: &str = "dev.fasa.Fasa1.Error";

/// Object path of job `id`.
pub fn job_path(id: u64) -> String {
    format!("{JOB_PATH_PREFIX}/{id}")
}

/// Task objects (calibration, model pulls) live at `TASK_PATH_PREFIX/<n>`.
pub const TASK_PATH_PREFIX: &str = "/dev/fasa/Fasa1/Task";
pub const TASK_INTERFACE: &str = "dev.fasa.Fasa1.Task";
/// The polkit action that loading, unloading, pulling models and calibrating need on the
/// system bus (root needs none).
pub const MANAGE_MODELS_ACTION: &str = "dev.fasa.Fasa1.manage-models";

/// Object path of task `id`.
pub fn task_path(id: u64) -> String {
    format!("{TASK_PATH_PREFIX}/{id}")
}
