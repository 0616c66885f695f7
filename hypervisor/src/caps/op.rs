// SPDX-License-Identifier: MIT OR Apache-2.0
//! The kinds of the messages on the inter-core rings (word 0, low byte): the capability
//! protocol's (`proto`), guest control's (`control`) and the channel links' (`links`);
//! membership's follow (`members::op`). Re-exported as `proto::op`.
//!
//! May call: nothing (a leaf of constants).

pub const INSERT: u64 = 1;
pub const INSERT_REPLY: u64 = 2;
pub const REVOKE: u64 = 3;
pub const REVOKE_REPLY: u64 = 4;
/// Guest control (see `caps::control`), carried on the same rings.
pub const CONTROL: u64 = 5;
pub const CONTROL_REPLY: u64 = 6;
pub const RELEASE: u64 = 7;
/// Channel links (see `caps::links`).
pub const LINK_DOWN: u64 = 8;
pub const LINK_ACK: u64 = 9;
pub const LINK_UP: u64 = 10;
// 11..=22: core membership's (`members::op`).
