// SPDX-License-Identifier: MIT OR Apache-2.0
//! The machine-wide counts that both the config format ([`crate::config`], which checks
//! them) and the guest ABI ([`crate::guest`], whose windows are sized by them) depend on,
//! kept below both so neither imports the other for them. May call: nothing.

/// Guests in one config.
pub const MAX_GUESTS: usize = 64;
/// Channels in one config.
pub const MAX_CHANNELS: usize = 256;
