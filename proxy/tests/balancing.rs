//! The proxy in this process, against loopback backends: spreading, backend sets changed under
//! load, health checks, balancers added and removed at run time, refused pushes.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_addr, get, get_on, load, Backend, Outcome};
use lightbyte_proxy::config::{BalancerConfig, HealthCheck, HealthKind, ProxyConfig, Selection};
use lightbyte_proxy::{ApplyError, Proxy};

fn balancer(name: &str, listen: SocketAddr, backends: &[&Backend]) -> BalancerConfig {
    let mut b = BalancerConfig::new(name, listen, backends.iter().map(|b| b.addr).collect());
    b.health = HealthCheck {
        interval_ms: 200,
        ..HealthCheck::default()
    };
    b.drain_grace_secs = 5;
    b
}

fn config(revision: u64, balancers: Vec<BalancerConfig>) -> ProxyConfig {
    ProxyConfig {
        revision,
        balancers,
    }
}

/// `n` requests for `/`, one after the other.
async fn requests(listen: SocketAddr, n: usize) -> Vec<Outcome> {
    let mut outcomes = Vec::with_capacity(n);
    for _ in 0..n {
        outcomes.push(get(listen, "/").await);
    }
    outcomes
}

fn tally(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for o in outcomes {
        let k = match o {
            Outcome::Ok(name) => name.clone(),
            other => format!("{other:?}"),
        };
        *t.entry(k).or_default() += 1;
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_evenly_over_every_backend() {
    let bs = [
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
    ];
    let listen = free_addr();
    let proxy = Proxy::default();
    proxy
        .apply(config(
            1,
            vec![balancer("web", listen, &bs.iter().collect::<Vec<_>>())],
        ))
        .await
        .unwrap();
    let outcomes = requests(listen, 300).await;
    let t = tally(&outcomes);
    assert_eq!(t.len(), 3, "{t:?}");
    for b in &bs {
        let n = t.get(&b.name).copied().unwrap_or(0);
        assert!((90..=110).contains(&n), "{} got {n} of 300: {t:?}", b.name);
    }

    // Consistent hashing keeps one client on one backend.
    let mut c = balancer("web", listen, &bs.iter().collect::<Vec<_>>());
    c.selection = Selection::Consistent;
    proxy.apply(config(2, vec![c])).await.unwrap();
    let outcomes = requests(listen, 30).await;
    assert_eq!(tally(&outcomes).len(), 1, "{:?}", tally(&outcomes));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_change_under_load_without_failures() {
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let b3 = Backend::start("b3").await;
    let listen = free_addr();
    let proxy = Proxy::default();
    proxy
        .apply(config(1, vec![balancer("web", listen, &[&b1, &b2])]))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let client = load(listen, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Scale up: b3 gets traffic, nothing fails.
    proxy
        .apply(config(2, vec![balancer("web", listen, &[&b1, &b2, &b3])]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(b3.hits() > 0, "the added backend got no request");

    // Scale down while b1 serves a slow request: that one finishes, and b1 gets no request
    // after the push returned.
    let slow = tokio::spawn(async move { get(listen, "/slow").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy
        .apply(config(3, vec![balancer("web", listen, &[&b2, &b3])]))
        .await
        .unwrap();
    let b1_at_removal = b1.hits();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::SeqCst);
    let outcomes: Vec<Outcome> = client.await.unwrap().into_iter().map(|(_, o)| o).collect();
    let t = tally(&outcomes);
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Ok(_))),
        "failed requests: {t:?}"
    );
    assert!(matches!(slow.await.unwrap(), Outcome::Ok(_)));
    // The client sends one request at a time: the one it had in flight when the push
    // returned may have picked b1 before the removal and reach it just after; no other may.
    assert!(
        b1.hits() <= b1_at_removal + 1,
        "the removed backend got requests after removal: {} at removal, {} now",
        b1_at_removal,
        b1.hits()
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selection_and_health_settings_change_in_place_under_load() {
    // A service stopped and restarted on the same port drops connections it accepted but had
    // not read a request from: these changes must not restart it.
    let bs = [Backend::start("b1").await, Backend::start("b2").await];
    let listen = free_addr();
    let proxy = Proxy::default();
    let refs: Vec<&Backend> = bs.iter().collect();
    proxy
        .apply(config(1, vec![balancer("web", listen, &refs)]))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let client = load(listen, stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    for revision in 2..8 {
        let mut c = balancer("web", listen, &refs);
        if revision % 2 == 0 {
            c.selection = Selection::Consistent;
        }
        c.health.interval_ms = 100 + revision * 10;
        proxy.apply(config(revision, vec![c])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let outcomes: Vec<Outcome> = client.await.unwrap().into_iter().map(|(_, o)| o).collect();
    let t = tally(&outcomes);
    assert!(outcomes.len() > 20, "too few requests to tell: {t:?}");
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Ok(_))),
        "failed requests: {t:?}"
    );
    // The last push (revision 7) asked for round robin: both backends serve again.
    let after = requests(listen, 20).await;
    assert_eq!(tally(&after).len(), 2, "{:?}", tally(&after));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_is_taken_out_within_two_intervals() {
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let listen = free_addr();
    let proxy = Proxy::default();
    proxy
        .apply(config(1, vec![balancer("web", listen, &[&b1, &b2])]))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let client = load(listen, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proxy.status().await.balancers[0].backends.clone();
    assert!(
        before.iter().all(|x| x.healthy && x.marked_down == 0),
        "{before:?}"
    );
    b1.kill();
    let killed = Instant::now();
    let unhealthy = loop {
        let s = proxy.status().await;
        let h = &s.balancers[0].backends;
        if h.iter().any(|x| x.address == b1.addr && !x.healthy) {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(5), "{h:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Two intervals of 200 ms (a refused connect fails a check at once), with room for a
    // loaded machine's scheduling.
    assert!(
        unhealthy < Duration::from_millis(2 * 200 + 400),
        "took {unhealthy:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let outcomes: Vec<Outcome> = client.await.unwrap().into_iter().map(|(_, o)| o).collect();
    // Before the check caught it, a connect to b1 failed and was retried on b2.
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Ok(_))),
        "{:?}",
        tally(&outcomes)
    );
    // The fall is counted (a backend that came back before a status read leaves the count).
    let after = proxy.status().await.balancers[0].backends.clone();
    let downs = |addr| {
        after
            .iter()
            .find(|x| x.address == addr)
            .unwrap()
            .marked_down
    };
    assert_eq!((downs(b1.addr), downs(b2.addr)), (1, 0), "{after:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_that_all_fail_their_checks_still_get_requests() {
    // Every backend answers its check (`/slow`, a second) later than the check's 200 ms, as an
    // overloaded host's backends do: all are marked unhealthy, yet they serve requests.
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let listen = free_addr();
    let proxy = Proxy::default();
    let mut web = balancer("web", listen, &[&b1, &b2]);
    web.health = HealthCheck {
        kind: HealthKind::Http,
        path: "/slow".into(),
        interval_ms: 200,
        timeout_ms: 200,
    };
    proxy.apply(config(1, vec![web])).await.unwrap();
    let started = Instant::now();
    loop {
        let s = proxy.status().await;
        if s.balancers[0].backends.iter().all(|x| !x.healthy) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcomes = requests(listen, 10).await;
    let t = tally(&outcomes);
    assert_eq!(
        (t.get("b1").copied(), t.get("b2").copied()),
        (Some(5), Some(5)),
        "{t:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancers_come_and_go_at_run_time() {
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let (l1, l2) = (free_addr(), free_addr());
    let proxy = Proxy::default();
    proxy
        .apply(config(1, vec![balancer("one", l1, &[&b1])]))
        .await
        .unwrap();
    assert_eq!(get(l1, "/").await, Outcome::Ok("b1".into()));
    assert_eq!(get(l2, "/").await, Outcome::Refused);
    proxy
        .apply(config(
            2,
            vec![balancer("one", l1, &[&b1]), balancer("two", l2, &[&b2])],
        ))
        .await
        .unwrap();
    assert_eq!(get(l2, "/").await, Outcome::Ok("b2".into()));
    // A connection accepted before the removal whose request comes just after it is served
    // (it was reset when the service's stop closed idle connections at once).
    let early = tokio::net::TcpStream::connect(l1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy
        .apply(config(3, vec![balancer("two", l2, &[&b2])]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get_on(early, "/").await, Outcome::Ok("b1".into()));
    // Removed: the port closes once its accept loop stopped.
    let t = Instant::now();
    while get(l1, "/").await != Outcome::Refused {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "balancer one still answers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(l2, "/").await, Outcome::Ok("b2".into()));
    // No backends: 503, not a hang.
    proxy
        .apply(config(4, vec![balancer("two", l2, &[])]))
        .await
        .unwrap();
    assert_eq!(get(l2, "/").await, Outcome::Status(503));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pushes_keep_the_last_good_configuration() {
    let b1 = Backend::start("b1").await;
    let l1 = free_addr();
    let proxy = Proxy::default();
    proxy
        .apply(config(5, vec![balancer("one", l1, &[&b1])]))
        .await
        .unwrap();
    let b2 = Backend::start("b2").await;
    // Stale.
    match proxy
        .apply(config(5, vec![balancer("one", l1, &[&b2])]))
        .await
    {
        Err(ApplyError::Stale { current: 5, .. }) => {}
        other => panic!("{other:?}"),
    }
    // Invalid.
    let mut bad = balancer("one", l1, &[&b2]);
    bad.health.interval_ms = 1;
    assert!(matches!(
        proxy.apply(config(6, vec![bad])).await,
        Err(ApplyError::Invalid(_))
    ));
    // A port that is taken: refused whole, the good balancer is untouched.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let r = proxy
        .apply(config(
            7,
            vec![
                balancer("one", l1, &[&b2]),
                balancer("two", taken.local_addr().unwrap(), &[&b2]),
            ],
        ))
        .await;
    assert!(matches!(r, Err(ApplyError::Listen { .. })), "{r:?}");
    let s = proxy.status().await;
    assert_eq!(s.revision, 5);
    assert_eq!(s.balancers.len(), 1);
    assert_eq!(s.balancers[0].backends[0].address, b1.addr);
    assert_eq!(get(l1, "/").await, Outcome::Ok("b1".into()));
    // Malformed text never gets that far.
    assert!(ProxyConfig::parse("{\"revision\": 9, \"balancers\": [{]}").is_err());
    proxy.shutdown().await;
}
