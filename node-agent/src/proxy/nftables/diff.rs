//! The nftables backend's diff: what turns one Service's last written rules into its new ones,
//! gathered over a sync into one `nft -f` transaction.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::{AffinitySet, Element, HAIRPIN, NftChain, Pick, ServiceRules, TABLE};
use crate::proxy::conntrack::UdpFlows;
use crate::proxy::model::Context;

/// What one Service had written, kept by the cache to diff the next rendering against.
#[derive(Debug, Clone, Default)]
pub struct Written {
    pub elements: Vec<Element>,
    pub chains: Vec<(String, u64)>,
    pub sets: Vec<AffinitySet>,
    pub hairpin_endpoints: Vec<Ipv4Addr>,
}

impl Written {
    /// What the cache keeps of a rendering (its elements moved, not copied: at 10,000 Services a
    /// copy is megabytes).
    pub fn of(rules: ServiceRules) -> (Self, Vec<UdpFlows>) {
        let chains = rules.chains.iter().map(|c| (c.name.clone(), c.hash())).collect();
        let written = Self {
            elements: rules.elements,
            chains,
            sets: rules.sets,
            hairpin_endpoints: rules.hairpin_endpoints,
        };
        (written, rules.udp)
    }
}

/// One transaction's worth of changes, gathered Service by Service and written in an order the
/// kernel accepts (elements out before the chains they name go; chains in before elements name
/// them).
#[derive(Debug, Default)]
pub struct Changes {
    pub(super) delete_elements: Vec<Element>,
    pub(super) add_elements: Vec<Element>,
    add_sets: Vec<AffinitySet>,
    delete_sets: Vec<String>,
    /// Chains to create (empty) before anything refers to them.
    add_chains: BTreeSet<String>,
    /// Chains whose rules are (re)written: flushed first when they existed.
    write_chains: Vec<(NftChain, bool)>,
    delete_chains: Vec<String>,
    pub hairpin_add: Vec<Ipv4Addr>,
    pub hairpin_delete: Vec<Ipv4Addr>,
}

impl Changes {
    /// Adds what turns `old` (None: nothing written) into `new`.
    pub fn service(&mut self, old: Option<&Written>, new: &ServiceRules) {
        let empty = Written::default();
        let old = old.unwrap_or(&empty);
        diff_sorted(&old.elements, &new.elements, &mut self.delete_elements, &mut self.add_elements);
        for c in &new.chains {
            let hash = c.hash();
            match old.chains.iter().find(|(n, _)| *n == c.name) {
                Some((_, h)) if *h == hash => {}
                Some(_) => self.write_chains.push((c.clone(), true)),
                None => {
                    self.add_chains.insert(c.name.clone());
                    self.write_chains.push((c.clone(), false));
                }
            }
        }
        for (name, _) in &old.chains {
            if !new.chains.iter().any(|c| c.name == *name) {
                self.delete_chains.push(name.clone());
            }
        }
        for s in &new.sets {
            if !old.sets.contains(s) {
                self.add_sets.push(s.clone());
            }
        }
        for s in &old.sets {
            if !new.sets.contains(s) {
                self.delete_sets.push(s.name.clone());
            }
        }
    }

    /// Adds the deletion of everything `old` wrote.
    pub fn removed(&mut self, old: &Written) {
        self.delete_elements.extend(old.elements.iter().cloned());
        self.delete_chains.extend(old.chains.iter().map(|(n, _)| n.clone()));
        self.delete_sets.extend(old.sets.iter().map(|s| s.name.clone()));
    }

    /// Creates a pick chain.
    pub fn pick(&mut self, ctx: &Context, pick: Pick) {
        let chain = NftChain { name: pick.chain(), rules: pick.rules(ctx) };
        self.add_chains.insert(chain.name.clone());
        self.write_chains.push((chain, false));
    }

    /// The pick chains the added elements send traffic to.
    pub fn picks(&self) -> BTreeSet<Pick> {
        self.add_elements.iter().filter_map(Element::pick).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.delete_elements.is_empty()
            && self.add_elements.is_empty()
            && self.add_sets.is_empty()
            && self.delete_sets.is_empty()
            && self.write_chains.is_empty()
            && self.delete_chains.is_empty()
            && self.hairpin_add.is_empty()
            && self.hairpin_delete.is_empty()
    }

    pub fn chains_written(&self) -> usize {
        self.write_chains.len()
    }

    pub fn chains_deleted(&self) -> usize {
        self.delete_chains.len()
    }

    /// The `nft -f` input.
    pub fn text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    /// Appends the `nft -f` input to `out`.
    pub fn write(&self, out: &mut String) {
        elements(out, "delete", &self.delete_elements, false);
        for s in &self.add_sets {
            let _ = writeln!(
                out,
                "add set ip {TABLE} {} {{ type ipv4_addr; flags dynamic,timeout; timeout {}s; }}",
                s.name, s.timeout_seconds
            );
        }
        for c in &self.add_chains {
            let _ = writeln!(out, "add chain ip {TABLE} {c}");
        }
        for (c, existed) in &self.write_chains {
            if *existed {
                let _ = writeln!(out, "flush chain ip {TABLE} {}", c.name);
            }
            for r in &c.rules {
                let _ = writeln!(out, "add rule ip {TABLE} {} {r}", c.name);
            }
        }
        elements(out, "add", &self.add_elements, true);
        for c in &self.delete_chains {
            let _ = writeln!(out, "flush chain ip {TABLE} {c}");
        }
        for c in &self.delete_chains {
            let _ = writeln!(out, "delete chain ip {TABLE} {c}");
        }
        for s in &self.delete_sets {
            let _ = writeln!(out, "delete set ip {TABLE} {s}");
        }
        let pairs =
            |ips: &[Ipv4Addr]| ips.iter().map(|ip| format!("{ip} . {ip}")).collect::<Vec<_>>().join(", ");
        if !self.hairpin_delete.is_empty() {
            let _ =
                writeln!(out, "delete element ip {TABLE} {HAIRPIN} {{ {} }}", pairs(&self.hairpin_delete));
        }
        if !self.hairpin_add.is_empty() {
            let _ = writeln!(out, "add element ip {TABLE} {HAIRPIN} {{ {} }}", pairs(&self.hairpin_add));
        }
    }
}

/// Elements of both sorted lists that are not in the other.
fn diff_sorted(old: &[Element], new: &[Element], gone: &mut Vec<Element>, added: &mut Vec<Element>) {
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                gone.push(a.clone());
                i += 1;
            }
            (Some(_), Some(b)) => {
                added.push(b.clone());
                j += 1;
            }
            (Some(a), None) => {
                gone.push(a.clone());
                i += 1;
            }
            (None, Some(b)) => {
                added.push(b.clone());
                j += 1;
            }
            (None, None) => break,
        }
    }
}

/// `add`/`delete element` lines, a thousand elements per line, map by map.
fn elements(out: &mut String, verb: &str, elements: &[Element], with_values: bool) {
    let mut by_map: Vec<&Element> = elements.iter().collect();
    by_map.sort_by_key(|e| e.map());
    for chunk in by_map.chunk_by(|a, b| a.map() == b.map()) {
        for part in chunk.chunks(1000) {
            let _ = write!(out, "{verb} element ip {TABLE} {} {{ ", part[0].map());
            for (i, e) in part.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&e.key());
                if with_values {
                    out.push_str(" : ");
                    out.push_str(&e.value());
                }
            }
            out.push_str(" }\n");
        }
    }
}
