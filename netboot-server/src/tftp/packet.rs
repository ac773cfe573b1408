//! TFTP packets on the wire: parse and encode (RFC 1350, options of RFC 2347).
//!
//! Pure functions on byte slices, no I/O. The parser is strict about what
//! makes a packet unusable (unknown opcode, a file name or mode without its
//! NUL terminator, a DATA/ACK shorter than its header) and lenient about the
//! option list, as RFC 2347 asks: an option cut off at the end of the packet
//! is dropped, and so is trailing NUL padding that some PXE ROMs send.

use bytes::Bytes;
use thiserror::Error;

/// Size of the fixed header of DATA and ACK packets (opcode + block number).
pub const HEADER_LEN: usize = 4;
/// The block size without the blksize option (RFC 1350).
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Smallest block size a client may ask for (RFC 2348).
pub const MIN_BLKSIZE: u16 = 8;
/// Largest block size a client may ask for (RFC 2348): 65535 - 20 (IP) - 8 (UDP) - 4 - 39.
pub const MAX_BLKSIZE: u16 = 65464;
/// At most this many options of a request are read; the rest are ignored.
pub const MAX_OPTIONS: usize = 32;

/// The opcodes of RFC 1350 and RFC 2347.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Rrq = 1,
    Wrq = 2,
    Data = 3,
    Ack = 4,
    Error = 5,
    Oack = 6,
}

impl Opcode {
    pub fn from_u16(v: u16) -> Option<Opcode> {
        Some(match v {
            1 => Opcode::Rrq,
            2 => Opcode::Wrq,
            3 => Opcode::Data,
            4 => Opcode::Ack,
            5 => Opcode::Error,
            6 => Opcode::Oack,
            _ => return None,
        })
    }
}

/// TFTP error codes (RFC 1350, 8 from RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 0: not defined, see the message.
    NotDefined,
    /// 1: file not found.
    FileNotFound,
    /// 2: access violation.
    AccessViolation,
    /// 3: disk full or allocation exceeded.
    DiskFull,
    /// 4: illegal TFTP operation.
    IllegalOperation,
    /// 5: unknown transfer ID.
    UnknownTid,
    /// 6: file already exists.
    FileExists,
    /// 7: no such user.
    NoSuchUser,
    /// 8: option negotiation refused (RFC 2347).
    OptionRefused,
    /// Any other code a peer sends.
    Other(u16),
}

impl ErrorCode {
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTid => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionRefused => 8,
            ErrorCode::Other(v) => v,
        }
    }

    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            0 => ErrorCode::NotDefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTid,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionRefused,
            v => ErrorCode::Other(v),
        }
    }
}

/// Transfer mode of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Text: the server converts LF to CR LF and CR to CR NUL.
    Netascii,
    /// Bytes as they are.
    Octet,
    /// Obsolete mail mode (RFC 1350); recognised so that it can be refused by name.
    Mail,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Netascii => "netascii",
            Mode::Octet => "octet",
            Mode::Mail => "mail",
        }
    }

    /// Mode names compare without regard to case (RFC 1350).
    pub fn parse(s: &[u8]) -> Option<Mode> {
        if s.eq_ignore_ascii_case(b"octet") {
            Some(Mode::Octet)
        } else if s.eq_ignore_ascii_case(b"netascii") {
            Some(Mode::Netascii)
        } else if s.eq_ignore_ascii_case(b"mail") {
            Some(Mode::Mail)
        } else {
            None
        }
    }
}

/// A read or write request: file name, mode and options in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub filename: String,
    pub mode: Mode,
    /// (name, value) pairs as the client spelled them; names compare without case.
    pub options: Vec<(String, String)>,
}

/// A parsed TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Rrq(Request),
    Wrq(Request),
    Data { block: u16, data: Bytes },
    Ack { block: u16 },
    Error { code: ErrorCode, message: String },
    Oack { options: Vec<(String, String)> },
}

/// Why a datagram is not a usable TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("packet of {0} bytes is too short")]
    TooShort(usize),
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("{0} is not terminated by NUL")]
    Unterminated(&'static str),
    #[error("empty file name")]
    EmptyFilename,
    #[error("file name is not valid UTF-8")]
    FilenameNotUtf8,
    #[error("unknown transfer mode {0:?}")]
    UnknownMode(String),
}

impl ParseError {
    /// The error code to answer a request that failed to parse with.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ParseError::FilenameNotUtf8 => ErrorCode::FileNotFound,
            _ => ErrorCode::IllegalOperation,
        }
    }
}

/// Reads the 16-bit opcode of a datagram, if it has one.
pub fn opcode_of(buf: &[u8]) -> Option<u16> {
    (buf.len() >= 2).then(|| u16::from_be_bytes([buf[0], buf[1]]))
}

/// Splits off a NUL-terminated field; `None` when there is no NUL.
fn take_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..nul], &buf[nul + 1..]))
}

/// Parses option pairs: stops at the first empty name (padding), at a name
/// or value without terminator (a cut-off option), or after [`MAX_OPTIONS`].
fn parse_options(mut rest: &[u8]) -> Vec<(String, String)> {
    let mut options = Vec::new();
    while options.len() < MAX_OPTIONS {
        let Some((name, after)) = take_cstr(rest) else {
            break;
        };
        if name.is_empty() {
            break;
        }
        let Some((value, after)) = take_cstr(after) else {
            break;
        };
        options.push((
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
        rest = after;
    }
    options
}

fn parse_request(body: &[u8]) -> Result<Request, ParseError> {
    let (name, rest) = take_cstr(body).ok_or(ParseError::Unterminated("file name"))?;
    let (mode, rest) = take_cstr(rest).ok_or(ParseError::Unterminated("mode"))?;
    if name.is_empty() {
        return Err(ParseError::EmptyFilename);
    }
    let mode = Mode::parse(mode)
        .ok_or_else(|| ParseError::UnknownMode(String::from_utf8_lossy(mode).into_owned()))?;
    let filename = std::str::from_utf8(name)
        .map_err(|_| ParseError::FilenameNotUtf8)?
        .to_owned();
    Ok(Request {
        filename,
        mode,
        options: parse_options(rest),
    })
}

impl Packet {
    /// Parses one datagram.
    pub fn parse(buf: &[u8]) -> Result<Packet, ParseError> {
        let op = opcode_of(buf).ok_or(ParseError::TooShort(buf.len()))?;
        let op = Opcode::from_u16(op).ok_or(ParseError::UnknownOpcode(op))?;
        let body = &buf[2..];
        let block = || {
            (body.len() >= 2)
                .then(|| u16::from_be_bytes([body[0], body[1]]))
                .ok_or(ParseError::TooShort(buf.len()))
        };
        Ok(match op {
            Opcode::Rrq => Packet::Rrq(parse_request(body)?),
            Opcode::Wrq => Packet::Wrq(parse_request(body)?),
            Opcode::Data => Packet::Data {
                block: block()?,
                data: Bytes::copy_from_slice(&body[2..]),
            },
            Opcode::Ack => Packet::Ack { block: block()? },
            Opcode::Error => {
                // Lenient: a peer's error ends the transfer even if its
                // message lost its terminator.
                let code = ErrorCode::from_u16(block()?);
                let msg = &body[2..];
                let msg = take_cstr(msg).map_or(msg, |(m, _)| m);
                Packet::Error {
                    code,
                    message: String::from_utf8_lossy(msg).into_owned(),
                }
            }
            Opcode::Oack => Packet::Oack {
                options: parse_options(body),
            },
        })
    }

    /// Appends the packet's wire form to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Packet::Rrq(r) | Packet::Wrq(r) => {
                let op = if matches!(self, Packet::Rrq(_)) {
                    Opcode::Rrq
                } else {
                    Opcode::Wrq
                };
                out.extend_from_slice(&(op as u16).to_be_bytes());
                push_cstr(out, &r.filename);
                push_cstr(out, r.mode.as_str());
                for (k, v) in &r.options {
                    push_cstr(out, k);
                    push_cstr(out, v);
                }
            }
            Packet::Data { block, data } => encode_data(out, *block, data),
            Packet::Ack { block } => {
                out.extend_from_slice(&(Opcode::Ack as u16).to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => encode_error(out, *code, message),
            Packet::Oack { options } => encode_oack(out, options),
        }
    }

    /// The packet's wire form.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// Appends `s` and its NUL terminator; NUL bytes inside `s` are left out so
/// that the field cannot end early.
fn push_cstr(out: &mut Vec<u8>, s: &str) {
    out.extend(s.bytes().filter(|&b| b != 0));
    out.push(0);
}

/// Appends a DATA packet.
pub fn encode_data(out: &mut Vec<u8>, block: u16, data: &[u8]) {
    out.reserve(HEADER_LEN + data.len());
    out.extend_from_slice(&(Opcode::Data as u16).to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an ERROR packet.
pub fn encode_error(out: &mut Vec<u8>, code: ErrorCode, message: &str) {
    out.extend_from_slice(&(Opcode::Error as u16).to_be_bytes());
    out.extend_from_slice(&code.as_u16().to_be_bytes());
    push_cstr(out, message);
}

/// Appends an OACK packet.
pub fn encode_oack(out: &mut Vec<u8>, options: &[(String, String)]) {
    out.extend_from_slice(&(Opcode::Oack as u16).to_be_bytes());
    for (k, v) in options {
        push_cstr(out, k);
        push_cstr(out, v);
    }
}

/// An ERROR packet as bytes.
pub fn error_packet(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + message.len());
    encode_error(&mut out, code, message);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn round_trips() {
        let packets = [
            Packet::Rrq(Request {
                filename: "pxelinux.0".into(),
                mode: Mode::Octet,
                options: opts(&[("blksize", "1468"), ("tsize", "0"), ("windowsize", "16")]),
            }),
            Packet::Wrq(Request {
                filename: "a/b".into(),
                mode: Mode::Netascii,
                options: vec![],
            }),
            Packet::Data {
                block: 65535,
                data: Bytes::from_static(b"hello"),
            },
            Packet::Data {
                block: 0,
                data: Bytes::new(),
            },
            Packet::Ack { block: 0 },
            Packet::Ack { block: 65535 },
            Packet::Error {
                code: ErrorCode::AccessViolation,
                message: "nope".into(),
            },
            Packet::Error {
                code: ErrorCode::Other(42),
                message: String::new(),
            },
            Packet::Oack {
                options: opts(&[("tsize", "123"), ("blksize", "1468")]),
            },
        ];
        for p in packets {
            assert_eq!(Packet::parse(&p.to_vec()), Ok(p.clone()), "{p:?}");
        }
    }

    #[test]
    fn known_bytes() {
        // An RRQ as tftp-hpa sends it in binary mode.
        let rrq = b"\x00\x01hello.txt\x00octet\x00";
        assert_eq!(
            Packet::parse(rrq),
            Ok(Packet::Rrq(Request {
                filename: "hello.txt".into(),
                mode: Mode::Octet,
                options: vec![],
            }))
        );
        let mut data = Vec::new();
        encode_data(&mut data, 258, b"xy");
        assert_eq!(data, b"\x00\x03\x01\x02xy");
        assert_eq!(
            error_packet(ErrorCode::FileNotFound, "no"),
            b"\x00\x05\x00\x01no\x00"
        );
    }

    #[test]
    fn mode_is_case_insensitive() {
        let p = Packet::parse(b"\x00\x01f\x00OcTeT\x00").unwrap();
        assert!(matches!(
            p,
            Packet::Rrq(Request {
                mode: Mode::Octet,
                ..
            })
        ));
        let p = Packet::parse(b"\x00\x01f\x00NETASCII\x00").unwrap();
        assert!(matches!(
            p,
            Packet::Rrq(Request {
                mode: Mode::Netascii,
                ..
            })
        ));
    }

    #[test]
    fn malformed() {
        use ParseError::*;
        let cases: &[(&[u8], ParseError)] = &[
            (b"", TooShort(0)),
            (b"\x00", TooShort(1)),
            (b"\x00\x00", UnknownOpcode(0)),
            (b"\x00\x07abc", UnknownOpcode(7)),
            (b"\xff\xff", UnknownOpcode(65535)),
            (b"\x00\x01", Unterminated("file name")),
            (b"\x00\x01file", Unterminated("file name")),
            (b"\x00\x01file\x00", Unterminated("mode")),
            (b"\x00\x01file\x00octet", Unterminated("mode")),
            (b"\x00\x01\x00octet\x00", EmptyFilename),
            (b"\x00\x01f\x00binary\x00", UnknownMode("binary".into())),
            (b"\x00\x01\xff\xfe\x00octet\x00", FilenameNotUtf8),
            (b"\x00\x03\x00", TooShort(3)),
            (b"\x00\x04", TooShort(2)),
            (b"\x00\x04\x01", TooShort(3)),
            (b"\x00\x05\x00", TooShort(3)),
        ];
        for (bytes, err) in cases {
            assert_eq!(Packet::parse(bytes).as_ref(), Err(err), "{bytes:?}");
        }
    }

    #[test]
    fn options_are_parsed_leniently() {
        // Trailing NUL padding, a value cut off, a name with no value.
        let p = Packet::parse(b"\x00\x01f\x00octet\x00blksize\x001468\x00\x00\x00\x00").unwrap();
        let Packet::Rrq(r) = p else { panic!() };
        assert_eq!(r.options, opts(&[("blksize", "1468")]));
        let p = Packet::parse(b"\x00\x01f\x00octet\x00tsize\x000\x00blksize\x0014").unwrap();
        let Packet::Rrq(r) = p else { panic!() };
        assert_eq!(r.options, opts(&[("tsize", "0")]));
        let p = Packet::parse(b"\x00\x01f\x00octet\x00tsize").unwrap();
        let Packet::Rrq(r) = p else { panic!() };
        assert!(r.options.is_empty());
    }

    #[test]
    fn option_count_is_bounded() {
        let mut pkt = b"\x00\x01f\x00octet\x00".to_vec();
        for i in 0..1000 {
            pkt.extend_from_slice(format!("x{i}\x001\x00").as_bytes());
        }
        let Packet::Rrq(r) = Packet::parse(&pkt).unwrap() else {
            panic!()
        };
        assert_eq!(r.options.len(), MAX_OPTIONS);
    }

    #[test]
    fn error_without_terminator_still_parses() {
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x00early terminate"),
            Ok(Packet::Error {
                code: ErrorCode::NotDefined,
                message: "early terminate".into()
            })
        );
    }

    #[test]
    fn nul_in_message_cannot_end_the_field_early() {
        let bytes = error_packet(ErrorCode::NotDefined, "a\0b");
        assert_eq!(bytes, b"\x00\x05\x00\x00ab\x00");
    }

    #[test]
    fn error_codes_round_trip() {
        for v in 0..20u16 {
            assert_eq!(ErrorCode::from_u16(v).as_u16(), v);
        }
    }
}
