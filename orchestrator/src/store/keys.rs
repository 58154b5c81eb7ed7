//! Where things live in etcd. Resources are `/lightbyte/<kind>/<name>`; the control plane's own
//! bookkeeping lives under `_`-prefixed segments, which no kind can have (kinds are DNS labels).

/// Every key the control plane writes starts with this.
pub const ROOT: &str = "/lightbyte/";

pub fn object(kind: &str, name: &str) -> String {
    format!("{ROOT}{kind}/{name}")
}

pub fn kind_prefix(kind: &str) -> String {
    format!("{ROOT}{kind}/")
}

/// The end of the key range of `prefix` (its last byte incremented): a prefix of ours ends in
/// an ASCII character, never 0xff.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// The key a controller's leader holds (value: the holder's identity, attached to its lease).
pub fn leader(controller: &str) -> String {
    format!("{ROOT}_leader/{controller}")
}

/// The last action of a controller, written in the same transaction as the action itself with
/// the leader's fencing token: its history in etcd shows who acted when.
pub fn action(controller: &str) -> String {
    format!("{ROOT}_actions/{controller}")
}

pub const HEARTBEAT_PREFIX: &str = "/lightbyte/_heartbeat/";

/// A worker agent's liveness key, attached to the agent's lease: it disappears when the lease
/// expires, which is how the worker-health controller learns a worker is gone.
pub fn heartbeat(worker: &str) -> String {
    format!("{HEARTBEAT_PREFIX}{worker}")
}

/// The name part of an object key under `prefix`.
pub fn name_of<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    key.strip_prefix(prefix)
}

pub const MOVE_TOKEN_PREFIX: &str = "/lightbyte/_moves/";

/// The secret of a VM's move under way: the source worker hands out the VM's disks only to a
/// request bearing it. Outside the resources, so the API never shows it.
pub fn move_token(vm: &str) -> String {
    format!("{MOVE_TOKEN_PREFIX}{vm}")
}
