//! `weft-cni`: Weft's CNI plugin (spec 1.1: ADD, DEL, CHECK, VERSION, STATUS, GC). The container
//! runtime runs it; it asks the weft agent on this node for the pod's address and sets up the pod's
//! veth, address and routes. See `weft_agent::plugin`.

use rscni_plugin::cni::Plugin;
use weft_agent::plugin::WeftCni;

fn main() {
    let plugin =
        Plugin::default().msg(concat!("weft-cni ", env!("CARGO_PKG_VERSION"), ": Weft's pod network"));
    // The error result is already on stdout (the spec's place for it); the exit code says it failed.
    if plugin.run(&WeftCni).is_err() {
        std::process::exit(1);
    }
}
