//! Kubernetes objects of any JSON (EndpointSlices, or core/v1 Endpoints
//! where the first byte is odd), as a watch delivers them: each decodes or
//! is refused without a panic; every peer they make is an `ip:port` named
//! by its own address with a known status; applying them one by one makes
//! the same peers as a fresh list of them (the relist after a lost watch);
//! and deleting every object leaves no peer behind.
#![no_main]
use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

#[allow(dead_code, unused_imports)]
#[path = "../../src/peers/mod.rs"]
mod peers;
#[allow(dead_code)]
#[path = "../../src/kubernetes/slices.rs"]
mod slices;
/// The one name `slices.rs` takes from the store.
mod store {
    pub type ResolvedPeers = std::collections::BTreeMap<
        String,
        (std::net::SocketAddr, crate::peers::PeerParams),
    >;
}

use slices::{Listing, Slices};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, json)) = data.split_first() else { return };
    if kind % 2 == 0 {
        check::<EndpointSlice>(json);
    } else {
        check::<Endpoints>(json);
    }
});

fn check<L: Listing + DeserializeOwned>(json: &[u8]) {
    let Ok(objects) = serde_json::from_slice::<Vec<L>>(json) else { return };
    let mut one_by_one = Slices::new("http", 1);
    let mut touched = BTreeSet::new();
    for o in &objects {
        touched.extend(one_by_one.apply("ns", o));
    }
    let mut listed = Slices::new("http", 1);
    listed.replace_namespace("ns", &objects);
    for name in &touched {
        let peers = one_by_one.peers(name);
        for (peer, (addr, params)) in &peers {
            assert_eq!(peer, &addr.to_string());
            assert!(matches!(params.status.as_str(), "up" | "not ready" | "terminating"));
        }
        assert_eq!(peers, listed.peers(name));
    }
    for o in &objects {
        if let Some(name) = o.meta().name.as_deref() {
            one_by_one.delete("ns", name);
        }
    }
    for name in &touched {
        assert!(one_by_one.peers(name).is_empty());
    }
}
