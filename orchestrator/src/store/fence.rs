//! Fencing: writes made on behalf of a leader-elected controller carry the leader key's create
//! revision (the fencing token) and only happen while that key still exists with that revision.
//! A leader that was paused past its lease and replaced cannot write, even if it does not yet
//! know it lost.

use etcd_client::{Compare, CompareOp, TxnOp};
use serde::{Deserialize, Serialize};

use super::keys;

/// The proof of leadership a fenced [`Store`](super::Store) attaches to every write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub controller: String,
    /// Who holds the leadership (a control-plane instance's identity).
    pub holder: String,
    /// The create revision of the leader key: every new leadership gets a larger one.
    pub token: i64,
}

/// What each fenced write leaves at `keys::action(controller)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub holder: String,
    pub token: i64,
    /// "update vm/web-1", ...
    pub action: String,
}

impl Fence {
    pub fn leader_key(&self) -> String {
        keys::leader(&self.controller)
    }

    /// True while the leader key is the one this leadership created; a deleted key has create
    /// revision 0, a key re-created by a successor a larger one.
    pub(crate) fn compare(&self) -> Compare {
        Compare::create_revision(self.leader_key(), CompareOp::Equal, self.token)
    }

    pub(crate) fn record(&self, action: String) -> TxnOp {
        let record = ActionRecord {
            holder: self.holder.clone(),
            token: self.token,
            action,
        };
        let value = serde_json::to_vec(&record).expect("an ActionRecord always serializes");
        TxnOp::put(keys::action(&self.controller), value, None)
    }
}
