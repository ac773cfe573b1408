//! Bytes to messages and back, never panicking on what arrives.
//!
//! dhcproto decodes the message; before it does, [`parse`] checks the few
//! things dhcproto would trip over in a debug build (its `debug_assert!`s on
//! the lengths of options 80, 81, 94 and 151-155, and a `chaddr` length over
//! 16), and the decode itself runs under `catch_unwind` as a last guard.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode, MAGIC, MIN_PACKET_SIZE};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

/// Why a datagram is not a usable DHCP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0} bytes is too short for a DHCP message (at least 240)")]
    TooShort(usize),
    #[error("no DHCP magic cookie")]
    NoMagic,
    #[error("hardware address length {0} is over 16")]
    BadHlen(u8),
    #[error("option {code} has a bad length {len}")]
    BadOptionLength { code: u8, len: usize },
    #[error("option {0} runs past the end of the message")]
    TruncatedOption(u8),
    #[error("undecodable: {0}")]
    Decode(String),
}

/// The fixed BOOTP header plus the magic cookie.
const HEADER_LEN: usize = 240;

/// Decodes a datagram into a DHCP message, or says why it cannot.
pub fn parse(bytes: &[u8]) -> Result<Message, ParseError> {
    check(bytes)?;
    match std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(bytes))) {
        Ok(Ok(msg)) => Ok(msg),
        Ok(Err(e)) => Err(ParseError::Decode(e.to_string())),
        Err(_) => Err(ParseError::Decode("the decoder panicked".into())),
    }
}

/// Walks the raw options the way dhcproto does (runs of the same code are
/// concatenated, RFC 3396) and rejects lengths its decoder asserts on.
fn check(bytes: &[u8]) -> Result<(), ParseError> {
    if bytes.len() < HEADER_LEN {
        return Err(ParseError::TooShort(bytes.len()));
    }
    if bytes[2] > 16 {
        return Err(ParseError::BadHlen(bytes[2]));
    }
    if bytes[236..240] != MAGIC {
        return Err(ParseError::NoMagic);
    }
    let mut i = HEADER_LEN;
    // (code, merged length) of the run being read.
    let mut run: Option<(u8, usize)> = None;
    while i < bytes.len() {
        let code = bytes[i];
        if code == 0 || code == 255 {
            if let Some((c, len)) = run.take() {
                check_len(c, len)?;
            }
            if code == 255 {
                break;
            }
            i += 1;
            continue;
        }
        let Some(&len) = bytes.get(i + 1) else {
            return Err(ParseError::TruncatedOption(code));
        };
        let len = len as usize;
        if i + 2 + len > bytes.len() {
            return Err(ParseError::TruncatedOption(code));
        }
        run = match run {
            Some((c, sum)) if c == code => Some((c, sum + len)),
            Some((c, sum)) => {
                check_len(c, sum)?;
                Some((code, len))
            }
            None => Some((code, len)),
        };
        i += 2 + len;
    }
    if let Some((c, len)) = run {
        check_len(c, len)?;
    }
    Ok(())
}

fn check_len(code: u8, len: usize) -> Result<(), ParseError> {
    let ok = match code {
        80 => len == 0,        // rapid commit
        81 => len >= 3,        // client FQDN
        94 => len == 3,        // client network interface identifier
        151 => len >= 1,       // bulk leasequery status code
        152..=155 => len == 4, // bulk leasequery times
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(ParseError::BadOptionLength { code, len })
    }
}

/// Encodes a reply, padded to the BOOTP minimum of 300 bytes that some PXE
/// ROMs insist on.
pub fn encode(msg: &Message) -> Result<Vec<u8>, dhcproto::error::EncodeError> {
    let mut buf = Vec::with_capacity(MIN_PACKET_SIZE);
    msg.encode(&mut Encoder::new(&mut buf))?;
    if buf.len() < MIN_PACKET_SIZE {
        buf.resize(MIN_PACKET_SIZE, 0);
    }
    Ok(buf)
}

/// The message type, if the message is a BOOTREQUEST that has one.
pub fn request_type(msg: &Message) -> Option<MessageType> {
    if msg.opcode() != Opcode::BootRequest {
        return None;
    }
    msg.opts().msg_type()
}

/// Option 50, the address a client asks for.
pub fn requested_addr(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(a)) => Some(*a),
        _ => None,
    }
}

/// Option 54, the server a client addresses.
pub fn server_id(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(a)) => Some(*a),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut b = vec![0u8; 240];
        b[0] = 1;
        b[1] = 1;
        b[2] = 6;
        b[236..240].copy_from_slice(&MAGIC);
        b
    }

    fn with_opts(opts: &[u8]) -> Vec<u8> {
        let mut b = header();
        b.extend_from_slice(opts);
        b
    }

    #[test]
    fn minimal_discover_parses() {
        let m = parse(&with_opts(&[53, 1, 1, 255])).unwrap();
        assert_eq!(request_type(&m), Some(MessageType::Discover));
    }

    #[test]
    fn rejects_what_is_not_dhcp() {
        assert_eq!(parse(&[]), Err(ParseError::TooShort(0)));
        assert_eq!(parse(&[1; 239]), Err(ParseError::TooShort(239)));
        let mut b = with_opts(&[53, 1, 1, 255]);
        b[236] = 0;
        assert_eq!(parse(&b), Err(ParseError::NoMagic));
        let mut b = with_opts(&[53, 1, 1, 255]);
        b[2] = 17;
        assert_eq!(parse(&b), Err(ParseError::BadHlen(17)));
        assert_eq!(
            parse(&with_opts(&[53, 1, 1, 60, 9, b'P'])),
            Err(ParseError::TruncatedOption(60))
        );
        assert_eq!(
            parse(&with_opts(&[53])),
            Err(ParseError::TruncatedOption(53))
        );
    }

    #[test]
    fn rejects_option_lengths_the_decoder_asserts_on() {
        for (opts, code, len) in [
            (vec![94, 2, 1, 2, 255], 94, 2),
            (vec![94, 3, 1, 2, 1, 94, 3, 1, 2, 1, 255], 94, 6), // a run is concatenated
            (vec![80, 1, 0, 255], 80, 1),
            (vec![81, 1, 0], 81, 1),
            (vec![151, 0, 255], 151, 0),
            (vec![153, 2, 0, 0], 153, 2),
        ] {
            assert_eq!(
                parse(&with_opts(&opts)),
                Err(ParseError::BadOptionLength { code, len }),
                "{opts:?}"
            );
        }
        // The same option twice, not adjacent, is two runs.
        assert!(parse(&with_opts(&[94, 3, 1, 2, 1, 0, 94, 3, 1, 2, 1, 255])).is_ok());
        assert!(parse(&with_opts(&[80, 0, 53, 1, 1, 255])).is_ok());
    }

    /// Why the check exists: dhcproto's decoder asserts on these lengths
    /// in a debug build (a panic per malformed datagram otherwise).
    #[test]
    #[cfg(debug_assertions)]
    fn the_decoder_itself_panics_on_them() {
        let b = with_opts(&[53, 1, 1, 94, 2, 1, 2, 255]);
        let r = std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(&b)));
        assert!(r.is_err());
    }

    #[test]
    fn no_message_type_parses_but_has_no_type() {
        let m = parse(&with_opts(&[255])).unwrap();
        assert_eq!(request_type(&m), None);
        // A BOOTREPLY is not a request.
        let mut b = with_opts(&[53, 1, 2, 255]);
        b[0] = 2;
        assert_eq!(request_type(&parse(&b).unwrap()), None);
    }

    #[test]
    fn encode_pads_to_300() {
        let m = parse(&with_opts(&[53, 1, 1, 255])).unwrap();
        let b = encode(&m).unwrap();
        assert_eq!(b.len(), 300);
        assert_eq!(
            request_type(&parse(&b).unwrap()),
            Some(MessageType::Discover)
        );
    }
}
