//! strongSwan's VICI wire format: packets framed by a 32-bit big-endian length, each a type
//! byte, a name (for requests and events) and a message of sections, key/values and lists.
//!
//! Written here rather than taken from a crate: the format is a few dozen lines, and the one
//! Rust client on crates.io pulls in its own runtime choices for what is three requests.

use std::fmt;

/// Packet types (`vici_socket.h` in strongSwan).
pub const CMD_REQUEST: u8 = 0;
pub const CMD_RESPONSE: u8 = 1;
pub const CMD_UNKNOWN: u8 = 2;
pub const EVENT: u8 = 7;

/// Message element types.
const SECTION_START: u8 = 1;
const SECTION_END: u8 = 2;
const KEY_VALUE: u8 = 3;
const LIST_START: u8 = 4;
const LIST_ITEM: u8 = 5;
const LIST_END: u8 = 6;

/// The largest packet charon accepts (its `VICI_MESSAGE_SIZE_MAX`); also our read limit.
pub const MAX_PACKET: usize = 512 * 1024;

/// One value of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Element {
    Value(Vec<u8>),
    List(Vec<Vec<u8>>),
    Section(Message),
}

/// A VICI message: named elements in order (charon reads some in order, e.g. proposals).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message(pub Vec<(String, Element)>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("name {0:?} is longer than 255 bytes")]
    NameTooLong(String),
    #[error("value of {0:?} is longer than 65535 bytes")]
    ValueTooLong(String),
    #[error("message truncated")]
    Truncated,
    #[error("unexpected element type {0} in a message")]
    BadElement(u8),
    #[error("a section or list is not closed")]
    Unclosed,
    #[error("a section end without a section")]
    UnbalancedEnd,
}

impl Message {
    pub fn new() -> Self {
        Message::default()
    }

    pub fn kv(mut self, key: &str, value: impl Into<Vec<u8>>) -> Self {
        self.0.push((key.into(), Element::Value(value.into())));
        self
    }

    pub fn list<I, V>(mut self, key: &str, items: I) -> Self
    where
        I: IntoIterator<Item = V>,
        V: Into<Vec<u8>>,
    {
        let items = items.into_iter().map(Into::into).collect();
        self.0.push((key.into(), Element::List(items)));
        self
    }

    pub fn section(mut self, key: &str, inner: Message) -> Self {
        self.0.push((key.into(), Element::Section(inner)));
        self
    }

    pub fn get(&self, key: &str) -> Option<&Element> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, e)| e)
    }

    /// A key/value as text; `None` when absent or not a plain value.
    pub fn str(&self, key: &str) -> Option<String> {
        match self.get(key) {
            Some(Element::Value(v)) => Some(String::from_utf8_lossy(v).into_owned()),
            _ => None,
        }
    }

    /// A list's items as text; `None` when absent or not a list.
    pub fn strs(&self, key: &str) -> Option<Vec<String>> {
        match self.get(key) {
            Some(Element::List(items)) => Some(
                items
                    .iter()
                    .map(|i| String::from_utf8_lossy(i).into_owned())
                    .collect(),
            ),
            _ => None,
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        for (key, element) in &self.0 {
            match element {
                Element::Value(v) => {
                    out.push(KEY_VALUE);
                    put_name(out, key)?;
                    put_value(out, key, v)?;
                }
                Element::List(items) => {
                    out.push(LIST_START);
                    put_name(out, key)?;
                    for item in items {
                        out.push(LIST_ITEM);
                        put_value(out, key, item)?;
                    }
                    out.push(LIST_END);
                }
                Element::Section(inner) => {
                    out.push(SECTION_START);
                    put_name(out, key)?;
                    inner.encode(out)?;
                    out.push(SECTION_END);
                }
            }
        }
        Ok(())
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        let mut r = Reader { bytes, at: 0 };
        let msg = r.message(0)?;
        if r.at < bytes.len() {
            return Err(WireError::UnbalancedEnd);
        }
        Ok(msg)
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) -> Result<(), WireError> {
    let len = u8::try_from(name.len()).map_err(|_| WireError::NameTooLong(name.into()))?;
    out.push(len);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

fn put_value(out: &mut Vec<u8>, key: &str, v: &[u8]) -> Result<(), WireError> {
    let len = u16::try_from(v.len()).map_err(|_| WireError::ValueTooLong(key.into()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(v);
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        let end = self.at.checked_add(n).ok_or(WireError::Truncated)?;
        let s = self.bytes.get(self.at..end).ok_or(WireError::Truncated)?;
        self.at = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn name(&mut self) -> Result<String, WireError> {
        let len = self.byte()? as usize;
        Ok(String::from_utf8_lossy(self.take(len)?).into_owned())
    }

    fn value(&mut self) -> Result<Vec<u8>, WireError> {
        let len = self.take(2)?;
        let len = u16::from_be_bytes([len[0], len[1]]) as usize;
        Ok(self.take(len)?.to_vec())
    }

    /// Elements up to the end of the input (depth 0) or the matching section end.
    fn message(&mut self, depth: usize) -> Result<Message, WireError> {
        let mut msg = Message::new();
        loop {
            if self.at == self.bytes.len() {
                return if depth == 0 {
                    Ok(msg)
                } else {
                    Err(WireError::Unclosed)
                };
            }
            match self.byte()? {
                KEY_VALUE => {
                    let k = self.name()?;
                    let v = self.value()?;
                    msg.0.push((k, Element::Value(v)));
                }
                SECTION_START => {
                    let k = self.name()?;
                    let inner = self.message(depth + 1)?;
                    msg.0.push((k, Element::Section(inner)));
                }
                SECTION_END if depth > 0 => return Ok(msg),
                SECTION_END => return Err(WireError::UnbalancedEnd),
                LIST_START => {
                    let k = self.name()?;
                    let mut items = Vec::new();
                    loop {
                        if self.at == self.bytes.len() {
                            return Err(WireError::Unclosed);
                        }
                        match self.byte()? {
                            LIST_ITEM => items.push(self.value()?),
                            LIST_END => break,
                            other => return Err(WireError::BadElement(other)),
                        }
                    }
                    msg.0.push((k, Element::List(items)));
                }
                other => return Err(WireError::BadElement(other)),
            }
        }
    }
}

/// A whole request packet, length prefix included.
pub fn request_packet(command: &str, msg: &Message) -> Result<Vec<u8>, WireError> {
    let mut body = vec![CMD_REQUEST];
    put_name(&mut body, command)?;
    msg.encode(&mut body)?;
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// A received packet (without its length prefix): its type, its name for named types, and its
/// message.
#[derive(Debug, PartialEq, Eq)]
pub struct Packet {
    pub kind: u8,
    pub name: Option<String>,
    pub message: Message,
}

pub fn parse_packet(body: &[u8]) -> Result<Packet, WireError> {
    let mut r = Reader { bytes: body, at: 0 };
    let kind = r.byte()?;
    let name = match kind {
        CMD_REQUEST | EVENT | 3 | 4 => Some(r.name()?),
        _ => None,
    };
    let message = Message::decode(&body[r.at..])?;
    Ok(Packet {
        kind,
        name,
        message,
    })
}

impl fmt::Display for Message {
    /// The shape of a message for logs, with values shown; callers never log one holding a key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (k, e)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match e {
                Element::Value(v) => write!(f, "{k}={}", String::from_utf8_lossy(v))?,
                Element::List(items) => {
                    let items: Vec<_> = items.iter().map(|i| String::from_utf8_lossy(i)).collect();
                    write!(f, "{k}=[{}]", items.join(","))?
                }
                Element::Section(inner) => write!(f, "{k}={inner}")?,
            }
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_each_element_as_the_wire_format_defines() {
        let msg = Message::new()
            .kv("a", "xy")
            .list("l", ["1", "22"])
            .section("s", Message::new().kv("k", ""));
        let mut out = Vec::new();
        msg.encode(&mut out).unwrap();
        assert_eq!(
            out,
            [
                &[3, 1, b'a', 0, 2, b'x', b'y'][..],
                &[4, 1, b'l', 5, 0, 1, b'1', 5, 0, 2, b'2', b'2', 6],
                &[1, 1, b's', 3, 1, b'k', 0, 0, 2],
            ]
            .concat()
        );
    }

    #[test]
    fn a_request_packet_is_length_type_name_message() {
        let p = request_packet("get-conns", &Message::new()).unwrap();
        assert_eq!(&p[..4], &[0, 0, 0, 11]);
        assert_eq!(p[4], CMD_REQUEST);
        assert_eq!(p[5], 9);
        assert_eq!(&p[6..], b"get-conns");
    }

    #[test]
    fn messages_round_trip_with_nesting_and_order_kept() {
        let msg = Message::new()
            .section(
                "conn",
                Message::new().list("local_addrs", ["198.18.0.10"]).section(
                    "children",
                    Message::new().section("c", Message::new().kv("mode", "tunnel")),
                ),
            )
            .kv("z", "1")
            .kv("a", "2");
        let mut out = Vec::new();
        msg.encode(&mut out).unwrap();
        assert_eq!(Message::decode(&out).unwrap(), msg);
    }

    #[test]
    fn a_response_packet_parses() {
        let mut body = vec![CMD_RESPONSE];
        Message::new()
            .kv("success", "no")
            .kv("errmsg", "bad")
            .encode(&mut body)
            .unwrap();
        let p = parse_packet(&body).unwrap();
        assert_eq!(p.kind, CMD_RESPONSE);
        assert_eq!(p.name, None);
        assert_eq!(p.message.str("success").as_deref(), Some("no"));
        assert_eq!(p.message.str("errmsg").as_deref(), Some("bad"));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert_eq!(Message::decode(&[3, 5, b'a']), Err(WireError::Truncated));
        assert_eq!(Message::decode(&[1, 1, b's']), Err(WireError::Unclosed));
        assert_eq!(Message::decode(&[2]), Err(WireError::UnbalancedEnd));
        assert_eq!(
            Message::decode(&[4, 1, b'l', 5, 0]),
            Err(WireError::Truncated)
        );
        assert_eq!(
            Message::decode(&[4, 1, b'l', 3]),
            Err(WireError::BadElement(3))
        );
        assert_eq!(Message::decode(&[9]), Err(WireError::BadElement(9)));
    }

    #[test]
    fn oversized_names_and_values_are_refused() {
        let long = "n".repeat(256);
        let mut out = Vec::new();
        assert_eq!(
            Message::new().kv(&long, "").encode(&mut out),
            Err(WireError::NameTooLong(long))
        );
        assert_eq!(
            Message::new().kv("k", vec![0; 65536]).encode(&mut out),
            Err(WireError::ValueTooLong("k".into()))
        );
    }
}
