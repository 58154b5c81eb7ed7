//! The route table: every endpoint, in one place, so the server, the client and the OpenAPI
//! document's drift test all read the same list.

use hyper::Method;

/// What an endpoint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `GET /api/v1/vmm/ping`.
    Ping,
    /// `PUT /api/v1/vm/create`.
    Create,
    /// `PUT /api/v1/vm/boot`.
    Boot,
    /// `PUT /api/v1/vm/shutdown`.
    Shutdown,
    /// `PUT /api/v1/vm/reboot`.
    Reboot,
    /// `PUT /api/v1/vm/pause`.
    Pause,
    /// `PUT /api/v1/vm/resume`.
    Resume,
    /// `GET /api/v1/vm/info`.
    Info,
    /// `PUT /api/v1/vm/snapshot`.
    Snapshot,
    /// `PUT /api/v1/vm/restore`.
    Restore,
}

/// One endpoint.
#[derive(Clone, Debug)]
pub struct Route {
    /// HTTP method.
    pub method: Method,
    /// Absolute path.
    pub path: &'static str,
    /// What it does.
    pub action: Action,
}

const fn route(method: Method, path: &'static str, action: Action) -> Route {
    Route {
        method,
        path,
        action,
    }
}

/// Every endpoint of the API, in the order of [`Action`]'s variants.
pub const ROUTES: &[Route] = &[
    route(Method::GET, "/api/v1/vmm/ping", Action::Ping),
    route(Method::PUT, "/api/v1/vm/create", Action::Create),
    route(Method::PUT, "/api/v1/vm/boot", Action::Boot),
    route(Method::PUT, "/api/v1/vm/shutdown", Action::Shutdown),
    route(Method::PUT, "/api/v1/vm/reboot", Action::Reboot),
    route(Method::PUT, "/api/v1/vm/pause", Action::Pause),
    route(Method::PUT, "/api/v1/vm/resume", Action::Resume),
    route(Method::GET, "/api/v1/vm/info", Action::Info),
    route(Method::PUT, "/api/v1/vm/snapshot", Action::Snapshot),
    route(Method::PUT, "/api/v1/vm/restore", Action::Restore),
];

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// An endpoint.
    Found(Action),
    /// The path exists with other methods: 405, with these in `Allow`.
    WrongMethod(Vec<Method>),
    /// No such path: 404.
    NotFound,
}

/// Finds the endpoint of `method` on `path` (the path without its query).
pub fn lookup(method: &Method, path: &str) -> Lookup {
    let mut allowed = Vec::new();
    for r in ROUTES.iter().filter(|r| r.path == path) {
        if r.method == *method {
            return Lookup::Found(r.action);
        }
        allowed.push(r.method.clone());
    }
    if allowed.is_empty() {
        Lookup::NotFound
    } else {
        Lookup::WrongMethod(allowed)
    }
}

impl Action {
    /// This action's route. [`ROUTES`] lists the actions in declaration order (a test checks),
    /// so the index is always in bounds.
    pub fn route(self) -> &'static Route {
        &ROUTES[self as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        assert_eq!(
            lookup(&Method::GET, "/api/v1/vm/info"),
            Lookup::Found(Action::Info)
        );
        assert_eq!(
            lookup(&Method::POST, "/api/v1/vm/boot"),
            Lookup::WrongMethod(vec![Method::PUT])
        );
        assert_eq!(lookup(&Method::GET, "/api/v1/vm/info/"), Lookup::NotFound);
        assert_eq!(lookup(&Method::GET, "/"), Lookup::NotFound);
    }

    #[test]
    fn every_action_has_one_route() {
        for (i, r) in ROUTES.iter().enumerate() {
            assert_eq!(r.action as usize, i, "ROUTES out of Action's order");
            assert_eq!(r.action.route().path, r.path);
            assert_eq!(
                ROUTES
                    .iter()
                    .filter(|o| o.path == r.path && o.method == r.method)
                    .count(),
                1
            );
        }
        // The last variant closes the table: no action without a route.
        assert_eq!(Action::Restore as usize + 1, ROUTES.len());
    }
}
