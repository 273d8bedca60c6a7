//! What sandboxes may reach over the network.
//!
//! [`firewall`] is the host's part: nftables tables that keep every sandbox off this
//! machine's own addresses, off private, loopback and link-local destinations, and off
//! every other sandbox, on whichever engine or network it runs.

pub mod egress;
pub mod egress_proxy;
pub mod egress_table;
pub mod firewall;
pub mod resolvers;

pub use firewall::{FirewallConfig, FirewallMode, FirewallStatus, HostFirewall};
