//! The agent's side of CNI: the conflist it writes for the container runtime, the install of the
//! `weft-cni` binary, and the unix socket the plugin asks for addresses on.
//!
//! Wiring (in the agent): open an [`crate::ipam::IpamHandle`] from the state dir, start
//! [`server::serve`] on the socket, and on every plan change that touches the node or the network
//! settings call `IpamHandle::set_blocks`/`set_mtu`, then [`conflist::render_conflist`] and
//! [`conflist::install`].

pub mod conflist;
pub mod protocol;
pub mod server;

pub use conflist::{InstallError, Installed, install, plugin_binary_next_to_agent, render_conflist};
pub use server::{CniServer, ServeError, serve};
