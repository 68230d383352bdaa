//! The local cluster: a real control plane built from source, nodes and pods as network
//! namespaces, and the test API the end-to-end tests are written against.

pub mod cluster;
