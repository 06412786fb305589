//! MAC addresses as text, the way `ip` and flannel write them (`aa:bb:cc:dd:ee:ff`): the one
//! codec flanneld (VTEP MACs in leases) and the CNI plugin (interfaces in results) share.

use std::fmt;

/// A MAC address.
pub type Mac = [u8; 6];

/// Displays link-layer address bytes as lower-case hex octets joined by `:`, without
/// allocating. Takes a slice because links report addresses of other lengths too.
pub struct MacDisplay<'a>(pub &'a [u8]);

impl fmt::Display for MacDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Formats a MAC address the way `ip` and flannel do (`aa:bb:cc:dd:ee:ff`).
pub fn format_mac(mac: &Mac) -> String {
    MacDisplay(mac).to_string()
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case); `None` when it is not exactly six hex octets.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips() {
        let mac = parse_mac("C6:d2:aa:01:02:03").unwrap();
        assert_eq!(mac, [0xc6, 0xd2, 0xaa, 1, 2, 3]);
        assert_eq!(format_mac(&mac), "c6:d2:aa:01:02:03");
        assert_eq!(MacDisplay(&mac).to_string(), "c6:d2:aa:01:02:03");
    }

    #[test]
    fn bad_macs_are_rejected() {
        for s in [
            "",
            "c6:d2:aa:01:02",
            "c6:d2:aa:01:02:03:04",
            "c6:d2:aa:01:02:0",
            "zz:d2:aa:01:02:03",
        ] {
            assert!(parse_mac(s).is_none(), "{s} parsed");
        }
    }

    #[test]
    fn other_lengths_display_too() {
        assert_eq!(MacDisplay(&[]).to_string(), "");
        assert_eq!(MacDisplay(&[0xab, 1]).to_string(), "ab:01");
    }
}
