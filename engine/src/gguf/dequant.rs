//! Dequantization of ggml blocks to f32, transcribed from ggml's `dequantize_row_*`
//! (ggml-quants.c). A block of `block_size` elements occupies `type_size` bytes; f16 scales
//! are little-endian IEEE half floats.
use super::{GgmlType, GgufError};

/// `n` elements of type `ty` from `bytes` (exactly `ty.bytes_for(n)` bytes) as f32.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, GgufError> {
    dequantize_named(ty, bytes, n, "(raw bytes)")
}

/// `dequantize`, naming `tensor` in errors.
pub(crate) fn dequantize_named(ty: GgmlType, bytes: &[u8], n: usize, tensor: &str) -> Result<Vec<f32>, GgufError> {
    let block_fn: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16_at(b, 0),
        GgmlType::BF16 => |b, y| y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => block_q4_0,
        GgmlType::Q4_1 => block_q4_1,
        GgmlType::Q5_0 => block_q5_0,
        GgmlType::Q5_1 => block_q5_1,
        GgmlType::Q8_0 => block_q8_0,
        GgmlType::Q4K => block_q4_k,
        GgmlType::Q5K => block_q5_k,
        GgmlType::Q6K => block_q6_k,
        GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q8K | GgmlType::Other(_) => {
            return Err(GgufError::UnsupportedType { tensor: tensor.to_string(), found: ty })
        }
    };
    // Every type matched above has a known layout.
    let (Some(block), Some(size)) = (ty.block_size(), ty.type_size()) else {
        return Err(GgufError::UnsupportedType { tensor: tensor.to_string(), found: ty });
    };
    let (block, size) = (block as usize, size as usize);
    let bad = |reason: String| GgufError::BadTensor { tensor: tensor.to_string(), reason };
    if n % block != 0 {
        return Err(bad(format!("{n} elements are not a whole number of {ty} blocks of {block}")));
    }
    let need = (n / block).checked_mul(size);
    if need != Some(bytes.len()) {
        return Err(bad(format!(
            "{n} elements of {ty} need {} bytes but {} were given",
            need.map_or("more than usize::MAX".to_string(), |b| b.to_string()),
            bytes.len()
        )));
    }
    let mut out = vec![0f32; n]; // (n,)
    for (b, y) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(block)) {
        block_fn(b, y);
    }
    Ok(out)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// d f16 | qs[16]: y[j] = (lo4(qs[j]) - 8)·d, y[j+16] = (hi4(qs[j]) - 8)·d.
fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// d f16 | m f16 | qs[16]: y[j] = lo4(qs[j])·d + m, y[j+16] = hi4(qs[j])·d + m.
fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// d f16 | qh u32 | qs[16]: bit j of qh is the 5th bit of y[j], bit j+16 that of y[j+16].
fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = (((qs[j] & 0x0F) | xh0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | xh1) as i32 - 16) as f32 * d;
    }
}

/// d f16 | m f16 | qh u32 | qs[16]: as Q5_0 without the -16, plus m.
fn block_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = ((qs[j] & 0x0F) | xh0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) | xh1) as f32 * d + m;
    }
}

/// d f16 | qs[32] i8: y[j] = qs[j]·d.
fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed 6-bit values of Q4_K/Q5_K
/// (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// d f16 | dmin f16 | scales[12] | qs[128]; 8 sub-blocks of 32, each with its own 6-bit
/// scale and min. 64 outputs per 32 bytes of qs: low nibbles, then high nibbles.
fn block_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * chunk..32 * chunk + 32];
        let y = &mut y[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// d f16 | dmin f16 | scales[12] | qh[32] | qs[128]: Q4_K plus a 5th bit per element from qh
/// (bit 2·chunk for the low nibbles of chunk `chunk`, bit 2·chunk+1 for the high ones).
fn block_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        let q = &qs[32 * chunk..32 * chunk + 32];
        let y = &mut y[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q[l] & 0x0F) + hi1) as f32 - m1;
            y[l + 32] = d2 * ((q[l] >> 4) + hi2) as f32 - m2;
        }
    }
}

/// ql[128] | qh[64] | scales[16] i8 | d f16; 16 sub-blocks of 16 with an 8-bit scale each;
/// a 6-bit value is 4 bits of ql and 2 of qh, minus 32. Two halves of 128 elements.
fn block_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f16 bytes of a value that f16 represents exactly.
    fn h(v: f32) -> [u8; 2] {
        let x = half::f16::from_f32(v);
        assert_eq!(x.to_f32(), v, "{v} is not exact in f16");
        x.to_le_bytes()
    }

    #[test]
    fn f32_f16_bf16() {
        let bytes: Vec<u8> = [1.5f32, -2.25].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &bytes, 2).unwrap(), [1.5, -2.25]);
        // 1.0, -2.0, 0.5, 65504 (largest f16), 2^-24 (smallest subnormal)
        let f16: Vec<u8> = [0x3C00u16, 0xC000, 0x3800, 0x7BFF, 0x0001].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F16, &f16, 5).unwrap(), [1.0, -2.0, 0.5, 65504.0, 2f32.powi(-24)]);
        let bf16: Vec<u8> = [0x3F80u16, 0xC040].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::BF16, &bf16, 2).unwrap(), [1.0, -3.0]);
    }

    #[test]
    fn q4_0_block() {
        // d = 2; qs[j] = j | (15-j) << 4 → y[j] = (j-8)·2, y[j+16] = (7-j)·2.
        let mut b = h(2.0).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(&y[..4], &[-16.0, -14.0, -12.0, -10.0]);
        assert_eq!(y[8], 0.0);
        assert_eq!(y[15], 14.0);
        assert_eq!(y[16], 14.0); // q = 15
        assert_eq!(y[31], -16.0); // q = 0
    }

    #[test]
    fn q4_1_blocks() {
        // Block 0: d = 0.5, m = -1; qs[j] = j | (15-j) << 4 → y[j] = j/2 - 1, y[j+16] = (15-j)/2 - 1.
        // Block 1: d = 0.25, m = 3; all nibbles 4 → 4.0.
        let mut b = h(0.5).to_vec();
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        b.extend(h(0.25));
        b.extend(h(3.0));
        b.extend([0x44u8; 16]);
        let y = dequantize(GgmlType::Q4_1, &b, 64).unwrap();
        assert_eq!(&y[..3], &[-1.0, -0.5, 0.0]);
        assert_eq!(y[15], 6.5);
        assert_eq!(y[16], 6.5);
        assert_eq!(y[31], -1.0);
        assert!(y[32..].iter().all(|&v| v == 4.0));
    }

    #[test]
    fn q5_0_and_q5_1_blocks() {
        // qh bits 0..16 set: y[j] gets its 5th bit; y[j+16] (high nibbles 0) does not.
        let mut b = h(1.0).to_vec();
        b.extend(0x0000_FFFFu32.to_le_bytes());
        b.extend(0..16u8);
        let y = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        let want: Vec<f32> = (0..16).map(|j| j as f32).chain([-16.0; 16]).collect();
        assert_eq!(y, want);

        // Q5_1: d = 0.5, m = -4; qh bits 16..32 set: y[j+16] = (15|16)·0.5 - 4 = 11.5.
        let mut b = h(0.5).to_vec();
        b.extend(h(-4.0));
        b.extend(0xFFFF_0000u32.to_le_bytes());
        b.extend([0xF0u8; 16]);
        let y = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
        assert!(y[..16].iter().all(|&v| v == -4.0));
        assert!(y[16..].iter().all(|&v| v == 11.5));
    }

    #[test]
    fn q8_0_block() {
        let mut b = h(0.25).to_vec();
        let qs: Vec<i8> = (0..32)
            .map(|j| {
                if j == 0 {
                    -128
                } else if j == 31 {
                    127
                } else {
                    j - 16
                }
            })
            .collect();
        b.extend(qs.iter().map(|&q| q as u8));
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(y[0], -32.0);
        assert_eq!(y[1], -3.75);
        assert_eq!(y[16], 0.0);
        assert_eq!(y[31], 31.75);
    }

    /// The 12 scale bytes of a Q4_K/Q5_K block holding 6-bit `sc` and `m` for 8 sub-blocks.
    fn pack_k4_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
        }
        s
    }

    const SC: [u8; 8] = [1, 2, 3, 4, 40, 50, 60, 63];
    const MN: [u8; 8] = [0, 1, 2, 3, 33, 44, 55, 63];

    #[test]
    fn q4_k_block() {
        // Sub-block sb, element l: q = (sb + l) % 16, low nibble for even sb, high for odd.
        let q = |sb: usize, l: usize| ((sb + l) % 16) as u8;
        let mut qs = [0u8; 128];
        for sb in 0..8 {
            for l in 0..32 {
                qs[32 * (sb / 2) + l] |= q(sb, l) << (4 * (sb % 2));
            }
        }
        let mut b = h(0.5).to_vec();
        b.extend(h(0.25));
        b.extend(pack_k4_scales(SC, MN));
        b.extend(qs);
        let y = dequantize(GgmlType::Q4K, &b, 256).unwrap();
        for sb in 0..8 {
            for l in 0..32 {
                let want = 0.5 * SC[sb] as f32 * q(sb, l) as f32 - 0.25 * MN[sb] as f32;
                assert_eq!(y[32 * sb + l], want, "sub-block {sb} element {l}");
            }
        }
        assert_eq!(y[32 * 7 + 1], 0.5 * 63.0 * 8.0 - 0.25 * 63.0);
    }

    #[test]
    fn q5_k_block() {
        // As Q4_K with 5-bit q = (3·sb + l) % 32; the 5th bit of sub-block sb is bit sb of qh[l].
        let q = |sb: usize, l: usize| ((3 * sb + l) % 32) as u8;
        let (mut qs, mut qh) = ([0u8; 128], [0u8; 32]);
        for sb in 0..8 {
            for l in 0..32 {
                qs[32 * (sb / 2) + l] |= (q(sb, l) & 0x0F) << (4 * (sb % 2));
                qh[l] |= (q(sb, l) >> 4) << sb;
            }
        }
        let mut b = h(0.5).to_vec();
        b.extend(h(0.25));
        b.extend(pack_k4_scales(SC, MN));
        b.extend(qh);
        b.extend(qs);
        let y = dequantize(GgmlType::Q5K, &b, 256).unwrap();
        for sb in 0..8 {
            for l in 0..32 {
                let want = 0.5 * SC[sb] as f32 * q(sb, l) as f32 - 0.25 * MN[sb] as f32;
                assert_eq!(y[32 * sb + l], want, "sub-block {sb} element {l}");
            }
        }
    }

    #[test]
    fn q6_k_block() {
        // Element e: half e/128, quarter (e%128)/32, l = e%32; 6-bit q = (7e) % 64, value
        // d·scale·(q - 32) with scale index 8·half + l/16 + 2·quarter.
        let q = |e: usize| ((7 * e) % 64) as u8;
        let scales: [i8; 16] = std::array::from_fn(|s| if s % 2 == 0 { s as i8 + 1 } else { -(s as i8) - 1 });
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for e in 0..256 {
            let (half, quarter, l) = (e / 128, (e % 128) / 32, e % 32);
            let lo_byte = 64 * half + l + 32 * (quarter % 2);
            ql[lo_byte] |= (q(e) & 0x0F) << (4 * (quarter / 2));
            qh[32 * half + l] |= (q(e) >> 4) << (2 * quarter);
        }
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(scales.iter().map(|&s| s as u8));
        b.extend(h(0.5));
        let y = dequantize(GgmlType::Q6K, &b, 256).unwrap();
        for (e, &got) in y.iter().enumerate() {
            let (half, quarter, l) = (e / 128, (e % 128) / 32, e % 32);
            let sc = scales[8 * half + l / 16 + 2 * quarter] as f32;
            assert_eq!(got, 0.5 * sc * (q(e) as i32 - 32) as f32, "element {e}");
        }
    }

    #[test]
    fn bad_sizes_and_unsupported_types() {
        let err = dequantize(GgmlType::Q8_0, &[0u8; 33], 32).unwrap_err();
        assert!(matches!(err, GgufError::BadTensor { .. }), "{err}");
        assert!(err.to_string().contains("need 34 bytes but 33"), "{err}");
        let err = dequantize(GgmlType::Q4_1, &[0u8; 20], 16).unwrap_err();
        assert!(err.to_string().contains("not a whole number of Q4_1 blocks of 32"), "{err}");
        for ty in [GgmlType::Q2K, GgmlType::Q3K, GgmlType::Q8K, GgmlType::Other(16)] {
            let err = dequantize(ty, &[], 0).unwrap_err();
            assert!(matches!(err, GgufError::UnsupportedType { found, .. } if found == ty), "{err}");
        }
        let err = dequantize(GgmlType::Other(16), &[], 0).unwrap_err();
        assert!(err.to_string().contains("IQ2_XXS (ggml type id 16)"), "{err}");
    }
}
