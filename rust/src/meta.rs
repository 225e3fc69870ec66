//! DICOM Part 10 file header: preamble, `DICM` prefix and File Meta Information group
//! 0002 (PS3.10 section 7.1), always explicit VR little endian (PS3.5 section 7.1.2).
//!
//! The data set bytes that follow it are written unchanged by other code.

/// This product's Implementation Class UID (0002,0012), a UUID-derived `2.25` UID.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.170282023813347804915073355187678686180";
/// This product's Implementation Version Name (0002,0013), at most 16 characters (SH).
pub const IMPLEMENTATION_VERSION_NAME: &str = "STORESCP_0_1";

/// Length of the preamble before `DICM` (PS3.10 section 7.1).
pub const PREAMBLE_LEN: usize = 128;

/// Appends a short-form explicit VR LE element (2-byte length). `value` is cut to
/// `max_len` bytes, then padded to even length with `pad`.
fn push_short(
    out: &mut Vec<u8>,
    element: u16,
    vr: &[u8; 2],
    value: &[u8],
    max_len: usize,
    pad: u8,
) {
    let value = value.get(..max_len).unwrap_or(value);
    let padded_len = value.len() + value.len() % 2;
    out.extend_from_slice(&0x0002u16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(vr);
    // `padded_len` <= 64 + 1, so it fits in u16.
    out.extend_from_slice(&(padded_len as u16).to_le_bytes());
    out.extend_from_slice(value);
    if value.len() % 2 == 1 {
        out.push(pad);
    }
}

/// Encodes the Part 10 header that precedes the data set in a stored file:
/// 128 zero bytes, `DICM`, then (0002,0000) UL group length, (0002,0001) OB `00\01`,
/// (0002,0002) UI Media Storage SOP Class UID, (0002,0003) UI Media Storage SOP Instance
/// UID, (0002,0010) UI Transfer Syntax UID, (0002,0012) UI Implementation Class UID,
/// (0002,0013) SH Implementation Version Name, and (0002,0016) AE Source Application
/// Entity Title (omitted when `source_ae` is empty or only spaces).
///
/// UIDs are padded to even length with NUL, SH/AE with space. Values longer than their VR
/// allows (UI 64, AE 16 bytes) are cut so that the header always stays well formed; callers
/// pass validated UIDs, so this never happens in practice.
pub fn encode_file_meta(
    sop_class_uid: &str,
    sop_instance_uid: &str,
    transfer_syntax_uid: &str,
    source_ae: &str,
) -> Vec<u8> {
    let mut group = Vec::with_capacity(256);
    // (0002,0001) File Meta Information Version: OB, 2 reserved bytes, 4-byte length.
    group.extend_from_slice(&[
        0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0, 2, 0, 0, 0, 0x00, 0x01,
    ]);
    push_short(&mut group, 0x0002, b"UI", sop_class_uid.as_bytes(), 64, 0);
    push_short(
        &mut group,
        0x0003,
        b"UI",
        sop_instance_uid.as_bytes(),
        64,
        0,
    );
    push_short(
        &mut group,
        0x0010,
        b"UI",
        transfer_syntax_uid.as_bytes(),
        64,
        0,
    );
    push_short(
        &mut group,
        0x0012,
        b"UI",
        IMPLEMENTATION_CLASS_UID.as_bytes(),
        64,
        0,
    );
    push_short(
        &mut group,
        0x0013,
        b"SH",
        IMPLEMENTATION_VERSION_NAME.as_bytes(),
        16,
        b' ',
    );
    let ae = source_ae.trim_matches(' ');
    if !ae.is_empty() {
        push_short(&mut group, 0x0016, b"AE", ae.as_bytes(), 16, b' ');
    }

    let mut out = Vec::with_capacity(PREAMBLE_LEN + 4 + 12 + group.len());
    out.resize(PREAMBLE_LEN, 0);
    out.extend_from_slice(b"DICM");
    // (0002,0000) File Meta Information Group Length, UL.
    out.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
    // The group is a few hundred bytes at most.
    out.extend_from_slice(&(group.len() as u32).to_le_bytes());
    out.extend_from_slice(&group);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Walks explicit VR LE elements of group 0002: (element, VR, value).
    fn walk(mut b: &[u8]) -> Vec<(u16, String, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let group = u16::from_le_bytes([b[0], b[1]]);
            assert_eq!(group, 2);
            let element = u16::from_le_bytes([b[2], b[3]]);
            let vr = String::from_utf8(b[4..6].to_vec()).unwrap();
            let (len, header) = if vr == "OB" {
                assert_eq!(&b[6..8], &[0, 0]);
                (
                    u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize,
                    12,
                )
            } else {
                (u16::from_le_bytes([b[6], b[7]]) as usize, 8)
            };
            assert_eq!(len % 2, 0, "odd length in {element:04x}");
            out.push((element, vr, b[header..header + len].to_vec()));
            b = &b[header + len..];
        }
        out
    }

    fn check(class: &str, inst: &str, ts: &str, ae: &str, expect_ae: Option<&[u8]>) {
        let m = encode_file_meta(class, inst, ts, ae);
        assert!(m[..128].iter().all(|&b| b == 0));
        assert_eq!(&m[128..132], b"DICM");
        let elems = walk(&m[132..]);
        assert_eq!(elems[0].0, 0x0000);
        assert_eq!(elems[0].1, "UL");
        let glen = u32::from_le_bytes(elems[0].2[..].try_into().unwrap()) as usize;
        assert_eq!(glen, m.len() - 132 - 12);
        let pad = |s: &str, p: u8| {
            let mut v = s.as_bytes().to_vec();
            if v.len() % 2 == 1 {
                v.push(p);
            }
            v
        };
        let mut expected = vec![
            (0x0001, "OB".to_string(), vec![0u8, 1]),
            (0x0002, "UI".into(), pad(class, 0)),
            (0x0003, "UI".into(), pad(inst, 0)),
            (0x0010, "UI".into(), pad(ts, 0)),
            (0x0012, "UI".into(), pad(IMPLEMENTATION_CLASS_UID, 0)),
            (0x0013, "SH".into(), pad(IMPLEMENTATION_VERSION_NAME, b' ')),
        ];
        if let Some(ae) = expect_ae {
            expected.push((0x0016, "AE".into(), ae.to_vec()));
        }
        assert_eq!(elems[1..].to_vec(), expected);
    }

    #[test]
    fn header_round_trip() {
        check(
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3.4.5",
            "1.2.840.10008.1.2",
            "STORESCU",
            Some(b"STORESCU"),
        );
        check(
            "1.2.840.10008.5.1.4.1.1.7",
            "1.2.3.4",
            "1.2.840.10008.1.2.1",
            "ODD",
            Some(b"ODD "),
        );
        check("1.2", "1.2.3", "1.2.840.10008.1.2.4.50", "", None);
        check("1.2", "1.2.3", "1.2.840.10008.1.2.4.50", "   ", None);
        check("1.2", "1.2.3", "1.2.840.10008.1.2", " AE ", Some(b"AE"));
    }

    #[test]
    fn constants_fit_their_vr() {
        assert!(IMPLEMENTATION_CLASS_UID.len() <= 64);
        assert!(IMPLEMENTATION_CLASS_UID
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.'));
        assert!(IMPLEMENTATION_VERSION_NAME.len() <= 16);
    }

    #[test]
    fn exact_bytes_of_a_small_header() {
        let m = encode_file_meta("1.2", "1.2.3", "1.2.840.10008.1.2", "A");
        let mut e = vec![0u8; 128];
        e.extend_from_slice(b"DICM");
        e.extend_from_slice(&[2, 0, 0, 0, b'U', b'L', 4, 0]);
        let body: Vec<u8> = [
            &[2, 0, 1, 0, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1][..],
            &[2, 0, 2, 0, b'U', b'I', 4, 0],
            b"1.2\0",
            &[2, 0, 3, 0, b'U', b'I', 6, 0],
            b"1.2.3\0",
            &[2, 0, 0x10, 0, b'U', b'I', 18, 0],
            b"1.2.840.10008.1.2\0",
            &[2, 0, 0x12, 0, b'U', b'I', 44, 0],
            IMPLEMENTATION_CLASS_UID.as_bytes(),
            &[2, 0, 0x13, 0, b'S', b'H', 12, 0],
            IMPLEMENTATION_VERSION_NAME.as_bytes(),
            &[2, 0, 0x16, 0, b'A', b'E', 2, 0],
            b"A ",
        ]
        .concat();
        e.extend_from_slice(&(body.len() as u32).to_le_bytes());
        e.extend_from_slice(&body);
        assert_eq!(m, e);
    }

    #[test]
    fn overlong_values_stay_well_formed() {
        let long = "1".repeat(100);
        let m = encode_file_meta(&long, &long, &long, "ABCDEFGHIJKLMNOPQRSTUVWXYZ");
        let elems = walk(&m[132..]);
        assert_eq!(elems[2].2.len(), 64);
        assert_eq!(elems.last().unwrap().2, b"ABCDEFGHIJKLMNOP");
    }
}
