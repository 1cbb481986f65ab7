//! `GET /v1/events`, the change feed over HTTP: every agent's durable events in commit
//! order behind an opaque cursor that survives a restart; paging, bad input, roles, and a
//! long poll that answers when a debit lands.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// How long a test waits for events to reach the feed (one indexing interval, usually).
const FEED_WAIT_MS: u64 = 5_000;

impl TestServer {
    /// One page of the feed after `cursor` (the start when empty).
    async fn events(&self, cursor: &str, limit: usize, wait_ms: u64) -> Resp {
        self.get(&format!(
            "/v1/events?after={cursor}&limit={limit}&wait_ms={wait_ms}"
        ))
        .await
    }

    /// Reads pages of `limit` from `cursor` until `count` events came; they and the cursor
    /// after them.
    async fn read_events(&self, cursor: &str, limit: usize, count: usize) -> (Vec<Value>, String) {
        let (mut out, mut cursor) = (Vec::new(), cursor.to_owned());
        let started = Instant::now();
        while out.len() < count {
            assert!(
                started.elapsed() < Duration::from_millis(FEED_WAIT_MS * 2),
                "only {} of {count} events reached the feed: {out:?}",
                out.len()
            );
            let r = self.events(&cursor, limit, 200).await;
            assert_eq!(r.status, 200, "{}", r.text);
            let page = r.body["events"].as_array().expect("events").clone();
            assert!(page.len() <= limit, "a page holds at most its limit");
            cursor = r.body["next_cursor"]
                .as_str()
                .expect("next_cursor")
                .to_owned();
            out.extend(page);
        }
        (out, cursor)
    }
}

/// `(agent_id, seq)` of each event.
fn ids(events: &[Value]) -> Vec<(String, u64)> {
    events
        .iter()
        .map(|e| {
            (
                e["agent_id"].as_str().expect("agent_id").to_owned(),
                e["seq"].as_u64().expect("seq"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_pages_every_agents_events_in_order_across_a_restart() {
    let mut s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    s.agent("a2", "default", 1_000).await;
    for i in 0..5 {
        assert_eq!(s.debit("a1", &format!("a1-{i}"), 10).await.status, 201);
        assert_eq!(s.debit("a2", &format!("a2-{i}"), 20).await.status, 201);
    }
    // 2 agents x (create, credit, 5 debits), acknowledged in this order.
    let mut acked = vec![("a1", 1), ("a1", 2), ("a2", 1), ("a2", 2)];
    for i in 0..5 {
        acked.push(("a1", 3 + i));
        acked.push(("a2", 3 + i));
    }
    let (events, cursor) = s.read_events("", 3, acked.len()).await;
    let acked: Vec<(String, u64)> = acked.iter().map(|(a, q)| ((*a).to_owned(), *q)).collect();
    assert_eq!(ids(&events), acked, "every event once, in commit order");
    // The entries are the journals' entries, with whose they are.
    let mut a1 = s.journal("a1").await;
    for e in &mut a1 {
        e["agent_id"] = "a1".into();
    }
    let fed: Vec<Value> = events
        .iter()
        .filter(|e| e["agent_id"] == "a1")
        .cloned()
        .collect();
    assert_eq!(fed, a1);
    assert_eq!(events[4]["kind"], "debit");
    assert_eq!(events[4]["amount_micros"], 10);

    // At the end: nothing more, and the cursor stays usable.
    let r = s.events(&cursor, 3, 0).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["events"], Value::Array(vec![]));
    let end = r.body["next_cursor"].as_str().expect("cursor").to_owned();

    // A cursor outlives a restart: from it come exactly the newer events.
    s.restart(config("")).await;
    assert_eq!(s.debit("a2", "after-restart", 5).await.status, 201);
    let (newer, _) = s.read_events(&end, 3, 1).await;
    assert_eq!(ids(&newer), vec![("a2".to_owned(), 8)]);
    let (again, _) = s.read_events(&cursor, 100, 1).await;
    assert_eq!(
        ids(&again),
        vec![("a2".to_owned(), 8)],
        "no duplicate, no gap"
    );
}

#[tokio::test]
async fn bad_cursors_limits_and_waits_are_400_and_the_feed_is_for_readers() {
    let s = TestServer::start().await;
    for bad in [
        "after=zzz!",
        "after=AQ",                 // base64, but not 13 bytes
        "after=AgAAAAAAAAABAAAAAA", // 13 bytes, unknown version 2
        "after=AQAAAAAAAAD6AAAAAA", // lsn 250: past the end of this feed
        "limit=0",
        "limit=1001",
        "wait_ms=30001",
        "wait_ms=-1",
    ] {
        let r = s.get(&format!("/v1/events?{bad}")).await;
        r.assert_problem(400, "invalid-request");
    }
    // The largest wait and limit are accepted (the feed is empty; with no wait it answers
    // at once).
    let r = s.get("/v1/events?limit=1000&wait_ms=0").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s.events("AQAAAAAAAAABAAAAAA", 1, 0).await;
    assert_eq!(r.status, 200, "a cursor this server wrote: {}", r.text);
    let anonymous = s.send(s.http.get(s.url("/v1/events"))).await;
    anonymous.assert_problem(401, "unauthorized");
    for token in [ADMIN, SERVICE, READER] {
        let r = s.call("GET", "/v1/events", token, None, None).await;
        assert_eq!(r.status, 200, "{token}: {}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_answers_when_a_debit_lands() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let (_, cursor) = s.read_events("", 10, 2).await;
    let poll = s.events(&cursor, 10, 30_000);
    let debit = async {
        // Real time, briefly: the poll must be waiting before the debit lands.
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.debit("a1", "k1", 7).await
    };
    let started = Instant::now();
    let (r, d) = tokio::join!(poll, debit);
    assert_eq!(d.status, 201);
    assert_eq!(r.status, 200, "{}", r.text);
    let got = r.body["events"].as_array().expect("events");
    assert_eq!(
        ids(got),
        vec![("a1".to_owned(), 3)],
        "the poll answered the debit"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered by the debit, not by the end of its wait"
    );
}
