//! Writing the policy table: the first sync (and any after a failure) replaces the whole table in
//! one transaction; after that a sync writes only the sets, chains and map elements that changed,
//! also in one. Either way a failed transaction changes nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::render::{Desired, NftSet};

/// The table (family `ip`) that holds the node's policy enforcement.
pub const TABLE: &str = "weft-policy";
pub const INGRESS_PODS: &str = "ingress-pods";
pub const EGRESS_PODS: &str = "egress-pods";
pub const QUARANTINE: &str = "quarantine";
/// The chains on the forward hook: what the periodic check looks for.
pub const BASE_CHAINS: [&str; 2] = ["egress", "ingress"];

/// The base chains and maps, written on a full sync only.
fn base(out: &mut String) {
    let _ = writeln!(out, "table ip {TABLE} {{");
    let _ = writeln!(out, "  set {QUARANTINE} {{ type ipv4_addr; }}");
    let _ = writeln!(out, "  map {INGRESS_PODS} {{ type ipv4_addr : verdict; }}");
    let _ = writeln!(out, "  map {EGRESS_PODS} {{ type ipv4_addr : verdict; }}");
    // Egress first: a packet between two pods of the node passes both.
    for (chain, priority, addr, map) in
        [(BASE_CHAINS[0], -1, "saddr", EGRESS_PODS), (BASE_CHAINS[1], 1, "daddr", INGRESS_PODS)]
    {
        let _ = writeln!(out, "  chain {chain} {{");
        let _ = writeln!(out, "    type filter hook forward priority {priority}; policy accept;");
        let _ = writeln!(out, "    ct state established,related accept");
        let _ = writeln!(out, "    ip {addr} @{QUARANTINE} counter drop");
        let _ = writeln!(out, "    ip {addr} vmap @{map}");
        let _ = writeln!(out, "  }}");
    }
    let _ = writeln!(out, "}}");
}

fn elements<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    items.into_iter().collect::<Vec<_>>().join(", ")
}

fn add_elements(out: &mut String, set: &str, items: &[String]) {
    // Large sets go in pieces: nft's parser handles long lines, but its error messages do not.
    for chunk in items.chunks(1000) {
        let _ = writeln!(
            out,
            "add element ip {TABLE} {set} {{ {} }}",
            elements(chunk.iter().map(String::as_str))
        );
    }
}

fn delete_elements(out: &mut String, set: &str, items: &[String]) {
    for chunk in items.chunks(1000) {
        let _ = writeln!(
            out,
            "delete element ip {TABLE} {set} {{ {} }}",
            elements(chunk.iter().map(String::as_str))
        );
    }
}

fn verdicts(map: &BTreeMap<Ipv4Addr, String>, keys: impl Iterator<Item = Ipv4Addr>) -> Vec<String> {
    keys.filter_map(|a| Some(format!("{a} : goto {}", map.get(&a)?))).collect()
}

/// The transaction that takes the table from `old` (what was written; `None`: unknown, replace
/// it all) to `new`.
pub fn script(old: Option<&Desired>, new: &Desired) -> String {
    let mut out = String::new();
    let empty = Desired::default();
    let full = old.is_none();
    let old = old.unwrap_or(&empty);
    if full {
        // Create it if missing so the delete cannot fail, then replace it.
        let _ = writeln!(out, "add table ip {TABLE}");
        let _ = writeln!(out, "delete table ip {TABLE}");
        base(&mut out);
    }
    // New sets and chains exist before any rule names them.
    // A set's type follows from its name's prefix (s-, b-, n-), so a kept set keeps its type.
    for (name, set) in new.sets.iter().filter(|(n, _)| !old.sets.contains_key(*n)) {
        let _ = writeln!(out, "add set ip {TABLE} {name} {{ {} }}", set.kind.declaration());
    }
    for name in new.chains.keys().filter(|c| !old.chains.contains_key(*c)) {
        let _ = writeln!(out, "add chain ip {TABLE} {name}");
    }
    for (name, set) in &new.sets {
        let (gone, added) = diff_elements(old.sets.get(name), set);
        delete_elements(&mut out, name, &gone);
        add_elements(&mut out, name, &added);
    }
    for (name, rules) in &new.chains {
        match old.chains.get(name) {
            Some(o) if o == rules => continue,
            Some(_) => {
                let _ = writeln!(out, "flush chain ip {TABLE} {name}");
            }
            None => {}
        }
        for rule in rules {
            let _ = writeln!(out, "add rule ip {TABLE} {name} {rule}");
        }
    }
    // The pods: what left or changed first, then what is new or changed.
    for (map, o, n) in [(INGRESS_PODS, &old.ingress, &new.ingress), (EGRESS_PODS, &old.egress, &new.egress)] {
        let gone: Vec<String> =
            o.iter().filter(|(a, c)| n.get(a) != Some(c)).map(|(a, _)| a.to_string()).collect();
        delete_elements(&mut out, map, &gone);
        let added = verdicts(n, n.iter().filter(|(a, c)| o.get(a) != Some(c)).map(|(a, _)| *a));
        add_elements(&mut out, map, &added);
    }
    let gone: Vec<String> = old.quarantine.difference(&new.quarantine).map(ToString::to_string).collect();
    delete_elements(&mut out, QUARANTINE, &gone);
    let added: Vec<String> = new.quarantine.difference(&old.quarantine).map(ToString::to_string).collect();
    add_elements(&mut out, QUARANTINE, &added);
    // Chains and sets no longer named: emptied first (pod chains jump to policy chains), then
    // deleted, then the sets their rules named.
    let gone_chains: Vec<&String> = old.chains.keys().filter(|c| !new.chains.contains_key(*c)).collect();
    for name in &gone_chains {
        let _ = writeln!(out, "flush chain ip {TABLE} {name}");
    }
    for name in &gone_chains {
        let _ = writeln!(out, "delete chain ip {TABLE} {name}");
    }
    for name in old.sets.keys().filter(|n| !new.sets.contains_key(*n)) {
        let _ = writeln!(out, "delete set ip {TABLE} {name}");
    }
    out
}

fn diff_elements(old: Option<&NftSet>, new: &NftSet) -> (Vec<String>, Vec<String>) {
    match old {
        None => (Vec::new(), new.elements.iter().cloned().collect()),
        Some(old) => (
            old.elements.difference(&new.elements).cloned().collect(),
            new.elements.difference(&old.elements).cloned().collect(),
        ),
    }
}
