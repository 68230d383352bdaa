//! The IPPools as IPAM, status and metrics see them: parsed once ([`pool_views`]), with the
//! overlaps between pools found, and each pool's status ([`pool_status`]) from the blocks handed
//! out of it and the addresses the agents report in use.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::Ipv4Net;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use weft_api::v1alpha1 as api;
use weft_api::v1alpha1::conditions::{condition_now, merge_conditions, reasons, types};

/// An IPPool as the allocator sees it.
#[derive(Debug, Clone)]
pub struct PoolView {
    pub name: String,
    pub cidr: Option<Ipv4Net>,
    pub block_size: u8,
    pub selector: Option<Selector>,
    pub disabled: bool,
    pub reserved: Vec<Ipv4Net>,
    /// Other pools sharing addresses with this one ("name (cidr)").
    pub overlaps: Vec<String>,
}

impl PoolView {
    /// Pools that may hand out blocks: valid, enabled, overlapping no other pool.
    pub fn usable(&self) -> bool {
        self.cidr.is_some() && !self.disabled && self.overlaps.is_empty()
    }

    /// Whether the pool may serve a node with `labels`.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.as_ref().is_none_or(|s| s.matches(labels))
    }
}

pub fn pool_views(pools: &[api::IPPool]) -> Vec<PoolView> {
    let parsed: Vec<(String, Option<Ipv4Net>, &api::IPPool)> =
        pools.iter().map(|p| (p.name_any(), p.spec.cidr.parse().ok(), p)).collect();
    parsed
        .iter()
        .map(|(name, cidr, pool)| PoolView {
            name: name.clone(),
            cidr: *cidr,
            block_size: pool.spec.block_size,
            selector: pool.spec.node_selector.clone().and_then(|s| Selector::try_from(s).ok()),
            disabled: pool.spec.disabled,
            reserved: pool.spec.reserved.iter().filter_map(|r| r.parse().ok()).collect(),
            overlaps: parsed
                .iter()
                .filter(|(other, theirs, _)| other != name && overlap(*cidr, *theirs))
                .map(|(other, _, p)| format!("{other} ({})", p.spec.cidr))
                .collect(),
        })
        .collect()
}

/// Whether two CIDRs share addresses (an unparsed one shares none).
pub fn overlap(a: Option<Ipv4Net>, b: Option<Ipv4Net>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.contains(&b.network()) || b.contains(&a.network()),
        _ => false,
    }
}

/// A pool's status from the blocks handed out of it and the addresses the agents report in use.
pub fn pool_status(
    pool: &api::IPPool,
    view: &PoolView,
    blocks: &[api::IPBlock],
    usage: &HashMap<String, u32>,
) -> api::IPPoolStatus {
    let old = pool.status.clone().unwrap_or_default();
    let observed = pool.metadata.generation;
    let name = pool.name_any();
    let Ok(cidr) = pool.spec.cidr.parse::<ipnet::Ipv4Net>() else {
        let msg = format!("spec.cidr {:?} is not an IPv4 CIDR", pool.spec.cidr);
        return api::IPPoolStatus {
            observed_generation: observed,
            conditions: merge_conditions(
                &old.conditions,
                vec![condition_now(types::READY, false, reasons::INVALID_SPEC, msg, observed)],
            ),
            ..Default::default()
        };
    };
    let prefix = u32::from(cidr.prefix_len());
    let block_bits = u32::from(pool.spec.block_size).saturating_sub(prefix).min(31);
    let total_blocks = 1u32 << block_bits;
    let mine: Vec<&api::IPBlock> = blocks.iter().filter(|b| b.spec.pool == name).collect();
    let allocated = u32::try_from(mine.len()).unwrap_or(u32::MAX);
    let nodes: BTreeSet<&str> = mine.iter().map(|b| b.spec.node.as_str()).collect();
    let total_addresses = 1u64 << (32 - prefix);
    let used_addresses: u64 =
        mine.iter().map(|b| u64::from(usage.get(&b.spec.cidr).copied().unwrap_or(0))).sum();
    let overlaps = &view.overlaps;
    let overlapping = if overlaps.is_empty() {
        condition_now(
            types::OVERLAPPING,
            false,
            reasons::NO_OVERLAP,
            "no other pool shares these addresses",
            observed,
        )
    } else {
        condition_now(
            types::OVERLAPPING,
            true,
            reasons::CIDR_OVERLAP,
            format!(
                "{} overlaps pool {}; no blocks are handed out of either until one changes",
                pool.spec.cidr,
                overlaps.join(", ")
            ),
            observed,
        )
    };
    let exhausted = if allocated >= total_blocks {
        condition_now(
            types::EXHAUSTED,
            true,
            reasons::NO_FREE_BLOCKS,
            format!(
                "all {total_blocks} blocks of /{} are handed out; add a pool or a larger CIDR",
                pool.spec.block_size
            ),
            observed,
        )
    } else {
        condition_now(
            types::EXHAUSTED,
            false,
            reasons::BLOCKS_AVAILABLE,
            format!("{} of {total_blocks} blocks free", total_blocks - allocated),
            observed,
        )
    };
    let ready = if pool.spec.disabled {
        condition_now(
            types::READY,
            false,
            reasons::DISABLED,
            "the pool is disabled: no new blocks are handed out",
            observed,
        )
    } else if !overlaps.is_empty() {
        condition_now(types::READY, false, reasons::CIDR_OVERLAP, "the pool overlaps another pool", observed)
    } else {
        condition_now(types::READY, true, reasons::RECONCILED, "the pool can hand out blocks", observed)
    };
    api::IPPoolStatus {
        observed_generation: observed,
        conditions: merge_conditions(&old.conditions, vec![ready, overlapping, exhausted]),
        total_blocks,
        allocated_blocks: allocated,
        blocks: Some(format!("{allocated}/{total_blocks}")),
        total_addresses,
        used_addresses,
        free_addresses: total_addresses - used_addresses,
        used_percent: u32::try_from(used_addresses * 100 / total_addresses).unwrap_or(100),
        nodes: u32::try_from(nodes.len()).unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
mod tests {
    use weft_api::v1alpha1::conditions as cond;

    use super::*;

    fn pool(name: &str, cidr: &str) -> api::IPPool {
        let mut p = api::IPPool::new(name, api::IPPoolSpec::new(cidr));
        p.metadata.generation = Some(3);
        p
    }

    #[test]
    fn overlapping_pools_are_flagged_with_the_other_pool_named() {
        let pools = vec![pool("a", "10.244.0.0/16"), pool("b", "10.244.8.0/24")];
        let status = pool_status(&pools[1], &pool_views(&pools)[1], &[], &HashMap::new());
        let c = cond::find_condition(&status.conditions, types::OVERLAPPING)
            .map(|c| (c.status.clone(), c.message.clone()));
        let (holds, message) = c.unwrap_or_default();
        assert_eq!(holds, "True");
        assert!(message.contains("a (10.244.0.0/16)"), "{message}");
        assert!(!cond::is_condition_true(&status.conditions, types::READY));
        assert_eq!(status.observed_generation, Some(3));
    }

    #[test]
    fn pool_counts_come_from_its_blocks() {
        let p = pool("a", "10.244.0.0/24");
        let blocks = vec![
            api::IPBlock::for_node("10.244.0.0/26", "a", "n1"),
            api::IPBlock::for_node("10.244.0.64/26", "a", "n1"),
            api::IPBlock::for_node("10.244.0.128/26", "a", "n2"),
            api::IPBlock::for_node("10.9.0.0/26", "other", "n3"),
        ];
        let usage = HashMap::from([("10.244.0.0/26".to_string(), 10), ("10.9.0.0/26".to_string(), 50)]);
        let status = pool_status(&p, &pool_views(std::slice::from_ref(&p))[0], &blocks, &usage);
        assert_eq!((status.total_blocks, status.allocated_blocks, status.nodes), (4, 3, 2));
        assert_eq!((status.total_addresses, status.used_addresses, status.free_addresses), (256, 10, 246));
        assert_eq!(status.used_percent, 3);
        assert!(!cond::is_condition_true(&status.conditions, types::EXHAUSTED));
    }
}
