//! How live objects hand their state to a snapshot and take it back (after Firecracker's
//! `Persist`): each device, the VM's interrupt controllers and clock, and the vCPUs own the
//! plain data that describes them, and the snapshot only gathers and stores it.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// An object whose state a snapshot keeps.
pub trait Persist {
    /// The state as plain, serializable data.
    type State: Serialize + DeserializeOwned;
    /// Why saving or restoring failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The object's current state (the VM is paused).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Takes `state` over. The object was just built from the same configuration as the one
    /// that was saved, and nothing runs yet.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}
