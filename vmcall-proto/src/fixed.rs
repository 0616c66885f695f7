// SPDX-License-Identifier: MIT OR Apache-2.0
//! Fixed-size, NUL-padded UTF-8 strings inside ABI structs.

/// Copies `s` into a NUL-padded field. Returns `None` if it does not fit (a full field
/// without a NUL is allowed) or contains a NUL.
pub fn put<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() > N || s.as_bytes().contains(&0) {
        return None;
    }
    let mut out = [0u8; N];
    out[..s.len()].copy_from_slice(s.as_bytes());
    Some(out)
}

/// Reads a NUL-padded field: the text before the first NUL. `None` if that is not UTF-8 or
/// if anything but NULs follows it.
pub fn get(field: &[u8]) -> Option<&str> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    if field[end..].iter().any(|&b| b != 0) {
        return None;
    }
    core::str::from_utf8(&field[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let f: [u8; 8] = put("alpha").unwrap();
        assert_eq!(get(&f), Some("alpha"));
        let full: [u8; 5] = put("alpha").unwrap();
        assert_eq!(get(&full), Some("alpha"));
        assert!(put::<4>("alpha").is_none());
        assert!(put::<8>("a\0b").is_none());
        assert_eq!(get(&[b'a', 0, b'b']), None, "junk after the NUL");
        assert_eq!(get(&[0xff, 0]), None, "not UTF-8");
    }
}
