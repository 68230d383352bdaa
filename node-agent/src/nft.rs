//! What the nftables tenants (the service proxy, network policy) share: reading which chains a
//! table holds from `nft -j list chains ip`, for their periodic checks.

use std::collections::HashSet;

/// `nft -j list chains` output, as far as the checks read it: the chains and their tables (the
/// `metainfo` entry and every other field are ignored).
#[derive(serde::Deserialize)]
struct ChainListing {
    nftables: Vec<ListedObject>,
}

#[derive(serde::Deserialize)]
struct ListedObject {
    chain: Option<ListedChain>,
}

#[derive(serde::Deserialize)]
struct ListedChain {
    table: String,
    name: String,
}

/// Whether every one of `chains` is in `table`, read from `nft -j list chains ip`. Output that
/// does not parse (no nft, no table) counts as missing chains. Only chains are listed: `nft list
/// chain` reads every set element into nft's cache first (2 s at 10,000 Services).
pub fn chains_present(listing_json: &str, table: &str, chains: &[&str]) -> bool {
    let Ok(listing) = serde_json::from_str::<ChainListing>(listing_json) else {
        return false;
    };
    let ours: HashSet<&str> = listing
        .nftables
        .iter()
        .filter_map(|object| object.chain.as_ref())
        .filter(|chain| chain.table == table)
        .map(|chain| chain.name.as_str())
        .collect();
    chains.iter().all(|chain| ours.contains(chain))
}
