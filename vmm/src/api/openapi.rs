//! Keeps `docs/api/openapi.yaml` true: its operations are exactly the route table's, its
//! request examples parse, and its schemas name exactly the fields the server reads and writes.

use std::collections::BTreeSet;

use serde_json::Value;

use vmm_api::routes::{lookup, Action, Lookup, ROUTES};
use vmm_api::types::{
    DiskCounters, ErrorBody, NetCounters, VmInfo, VmState, DEFAULT_SHUTDOWN_TIMEOUT_MS,
    MAX_SHUTDOWN_TIMEOUT_MS,
};
use vmm_api::MacAddr;

use super::body;
use crate::config::{DiskConfig, NetConfig, OnError, SerialConfig, VmConfig, VsockConfig};

const HTTP_METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options"];

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("docs/api/openapi.yaml");
    serde_yaml::from_str(&text).expect("openapi.yaml is valid YAML")
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let s = &doc["components"]["schemas"][name];
    assert!(s.is_object(), "schema {name} missing");
    s
}

fn properties(doc: &Value, name: &str) -> BTreeSet<String> {
    schema(doc, name)["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {name} has no properties"))
        .keys()
        .cloned()
        .collect()
}

/// The fields a body parser accepts, read from its own unknown-field message ("expected one of
/// `a`, `b`", "expected `a` or `b`", "there are no fields").
fn accepted_fields(
    parse: impl Fn(&[u8]) -> String,
    wrap: impl Fn(&str) -> String,
) -> BTreeSet<String> {
    let msg = parse(wrap(r#"{"zz_probe": 0}"#).as_bytes());
    assert!(msg.contains("unknown field `zz_probe`"), "{msg}");
    let list = msg.split_once("expected").map(|(_, l)| l).unwrap_or("");
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn err<T>(r: Result<T, body::BodyError>) -> String {
    match r {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn operations_match_the_route_table() {
    let doc = document();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            assert!(HTTP_METHODS.contains(&method.as_str()), "{path}: {method}");
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let served: BTreeSet<_> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(documented, served, "openapi.yaml and ROUTES differ");
}

#[test]
fn responses_match_the_handler() {
    let doc = document();
    for r in ROUTES {
        let op = &doc["paths"][r.path][r.method.as_str().to_lowercase()];
        let responses = op["responses"].as_object().unwrap();
        let success = match r.action {
            Action::Ping | Action::Info => "200",
            _ => "204",
        };
        assert!(
            responses.contains_key(success),
            "{} lacks {success}",
            r.path
        );
        for code in ["400", "408", "413", "415"] {
            assert!(responses.contains_key(code), "{} lacks {code}", r.path);
        }
        if !matches!(r.action, Action::Ping | Action::Info) {
            assert!(responses.contains_key("409"), "{} lacks 409", r.path);
        }
    }
}

#[test]
fn request_examples_parse() {
    let doc = document();
    let mut seen = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let example = &op["requestBody"]["content"]["application/json"]["example"];
            if example.is_null() {
                continue;
            }
            seen += 1;
            let bytes = serde_json::to_vec(example).unwrap();
            let m = hyper::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let Lookup::Found(action) = lookup(&m, path) else {
                panic!("{method} {path} is not a route");
            };
            let parsed = match action {
                Action::Create => err(body::parse_create(&bytes)),
                Action::Shutdown => err(body::parse_shutdown(&bytes)),
                Action::Snapshot => err(body::parse_snapshot(&bytes)),
                Action::Restore => err(body::parse_restore(&bytes)),
                other => panic!("{other:?} documents a body it does not take"),
            };
            assert_eq!(parsed, "", "{method} {path} example");
        }
    }
    assert_eq!(seen, 4);
}

#[test]
fn request_schemas_name_the_parsed_fields() {
    let doc = document();
    let create = |b: &[u8]| err(body::parse_create(b));
    assert_eq!(
        accepted_fields(create, str::to_string),
        properties(&doc, "VmConfig")
    );
    assert_eq!(
        accepted_fields(create, |p| format!(r#"{{"kernel":"k","disks":[{p}]}}"#)),
        properties(&doc, "DiskConfig")
    );
    assert_eq!(
        accepted_fields(create, |p| format!(r#"{{"kernel":"k","nets":[{p}]}}"#)),
        properties(&doc, "NetConfig")
    );
    assert_eq!(
        accepted_fields(create, |p| format!(r#"{{"kernel":"k","vsock":{p}}}"#)),
        properties(&doc, "VsockConfig")
    );
    assert_eq!(
        accepted_fields(|b| err(body::parse_shutdown(b)), str::to_string),
        properties(&doc, "ShutdownRequest")
    );
    assert_eq!(
        accepted_fields(|b| err(body::parse_snapshot(b)), str::to_string),
        properties(&doc, "SnapshotRequest")
    );
    assert_eq!(
        accepted_fields(|b| err(body::parse_restore(b)), str::to_string),
        properties(&doc, "RestoreRequest")
    );
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn response_schemas_name_the_serialized_fields() {
    let doc = document();
    let ping = serde_json::to_value(super::handler::ping()).unwrap();
    assert_eq!(keys(&ping), properties(&doc, "Ping"));
    let error = serde_json::to_value(ErrorBody { error: "x".into() }).unwrap();
    assert_eq!(keys(&error), properties(&doc, "Error"));

    let config = VmConfig {
        kernel: "/k".into(),
        firmware: None,
        initramfs: None,
        cmdline: String::new(),
        cpus: 1,
        memory: 1 << 30,
        serial: SerialConfig::Off,
        disks: vec![DiskConfig {
            path: "/d".into(),
            format: None,
            read_only: false,
            serial: None,
            direct: false,
            on_error: OnError::Pause,
        }],
        nets: vec![NetConfig {
            tap: "tap0".into(),
            mac: MacAddr::random(),
        }],
        vsock: Some(VsockConfig {
            cid: 3,
            socket: "/v".into(),
        }),
    };
    let info = serde_json::to_value(VmInfo {
        state: VmState::Running,
        config: Some(config),
        disks: vec![DiskCounters::default()],
        nets: vec![NetCounters::default()],
        exit_reason: None,
        pause_reason: Some("disk 0 (/d): write failed".into()),
    })
    .unwrap();
    assert_eq!(keys(&info), properties(&doc, "VmInfo"));
    assert_eq!(keys(&info["disks"][0]), properties(&doc, "DiskCounters"));
    assert_eq!(keys(&info["nets"][0]), properties(&doc, "NetCounters"));
    assert_eq!(
        keys(&info["config"]["disks"][0]),
        properties(&doc, "DiskConfig")
    );
    assert_eq!(
        keys(&info["config"]["nets"][0]),
        properties(&doc, "NetConfig")
    );
    // The info form of a configuration is the create form.
    assert_eq!(keys(&info["config"]), properties(&doc, "VmConfig"));
    assert_eq!(
        keys(&info["config"]["vsock"]),
        properties(&doc, "VsockConfig")
    );

    let states: BTreeSet<String> = schema(&doc, "VmState")["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let served: BTreeSet<String> = [
        VmState::NotCreated,
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
    ]
    .iter()
    .map(|s| {
        serde_json::to_value(s)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    })
    .collect();
    assert_eq!(states, served);
}

#[test]
fn documented_limits_are_the_servers() {
    let doc = document();
    let shutdown = &schema(&doc, "ShutdownRequest")["properties"]["timeout_ms"];
    assert_eq!(shutdown["default"], DEFAULT_SHUTDOWN_TIMEOUT_MS);
    assert_eq!(shutdown["maximum"], MAX_SHUTDOWN_TIMEOUT_MS);
    let cfg = &schema(&doc, "VmConfig")["properties"];
    assert_eq!(cfg["cmdline"]["default"], crate::config::DEFAULT_CMDLINE);
    assert_eq!(cfg["cpus"]["maximum"], crate::config::MAX_CPUS);
    assert_eq!(
        schema(&doc, "DiskConfig")["properties"]["serial"]["maxLength"],
        vmm_api::limits::MAX_DISK_SERIAL_LEN
    );
    assert_eq!(
        schema(&doc, "NetConfig")["properties"]["tap"]["maxLength"],
        vmm_api::limits::MAX_IFNAME_LEN
    );
    let defaults = body::parse_create(br#"{"kernel":"k"}"#).unwrap();
    let memory = cfg["memory"]["default"].as_str().unwrap();
    assert_eq!(vmm_api::parse::parse_size(memory), Ok(defaults.memory));
    assert_eq!(
        cfg["serial"]["default"].as_str().unwrap(),
        defaults.serial.to_string()
    );
    assert_eq!(cfg["cpus"]["default"], defaults.cpus);
}
