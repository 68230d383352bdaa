//! Schema fragments and CEL snippets shared by the Weft CRDs.
//!
//! Lists of strings are written by hand (`#[schemars(schema_with = ...)]`) so that every item
//! carries its own `x-kubernetes-validations` rule: the API server then points at the offending
//! entry (`spec.reserved[2]: Invalid value: ...`), and the rule's cost stays small because each
//! item has a `maxLength` and each list a `maxItems`.

use schemars::{Schema, SchemaGenerator, json_schema};

/// Longest CIDR string (IPv6 with a /128 prefix).
pub const CIDR_MAX_LEN: u32 = 43;
/// Longest resolver address: `[IPv6]:port`, or a path to a resolv.conf-style file.
pub const RESOLVER_MAX_LEN: u32 = 255;
/// Most CIDRs accepted in one list.
pub const CIDR_LIST_MAX: u32 = 64;

/// CEL rule: `self` is an IP address, `IPv4:port` or `[IPv6]:port`.
pub fn ip_or_ip_port_rule() -> String {
    "isIP(self) || (self.startsWith('[') ? \
     (self.indexOf(']:') > 1 && isIP(self.substring(1, self.indexOf(']:'))) \
      && self.substring(self.indexOf(']:') + 2).matches('^[0-9]{1,5}$') \
      && int(self.substring(self.indexOf(']:') + 2)) <= 65535) : \
     (self.split(':').size() == 2 && isIP(self.split(':')[0]) \
      && self.split(':')[1].matches('^[0-9]{1,5}$') && int(self.split(':')[1]) <= 65535))"
        .to_owned()
}

fn string_list(max_items: u32, max_length: u32, list_type: &str, rule: &str, message: &str) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": max_items,
        "x-kubernetes-list-type": list_type,
        "items": {
            "type": "string",
            "maxLength": max_length,
            "x-kubernetes-validations": [{ "rule": rule, "message": message }],
        },
    })
}

/// A set of IPv4 CIDRs. Weft's pod and Service networks are IPv4 only, and an IPv6 entry that
/// passed admission would reach the agents' renderers (which refuse it) instead of its author.
pub fn cidr_set(_: &mut SchemaGenerator) -> Schema {
    string_list(
        CIDR_LIST_MAX,
        CIDR_MAX_LEN,
        "set",
        "isCIDR(self) && cidr(self).ip().family() == 4",
        "must be an IPv4 CIDR such as 10.0.0.0/8 (Weft's networks are IPv4 only)",
    )
}

/// Upstream resolvers: an IP, `IP:port`, `[IPv6]:port`, or an absolute path to a resolv.conf file.
pub fn resolver_list(_: &mut SchemaGenerator) -> Schema {
    let rule = format!("self.startsWith('/') || {}", ip_or_ip_port_rule());
    string_list(
        8,
        RESOLVER_MAX_LEN,
        "atomic",
        &rule,
        "must be an IP address, IP:port, [IPv6]:port, or an absolute path to a resolv.conf file such as /etc/resolv.conf",
    )
}

/// DNS servers of a stub domain: an IP, `IP:port` or `[IPv6]:port`; at least one.
pub fn server_list(_: &mut SchemaGenerator) -> Schema {
    let mut schema = string_list(
        8,
        RESOLVER_MAX_LEN,
        "atomic",
        &ip_or_ip_port_rule(),
        "must be an IP address, IP:port or [IPv6]:port such as 10.0.0.53 or 10.0.0.53:5353",
    );
    schema.insert("minItems".to_owned(), 1.into());
    schema
}

/// CNI plugin types chained after weft-cni: binary names in the CNI bin dir.
pub fn plugin_list(_: &mut SchemaGenerator) -> Schema {
    string_list(
        8,
        63,
        "atomic",
        "self.matches('^[A-Za-z0-9][A-Za-z0-9._-]*$')",
        "must be a CNI plugin type, the name of a binary in the CNI bin dir such as portmap (no '/')",
    )
}
