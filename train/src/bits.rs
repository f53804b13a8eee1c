//! Bit-packed label rows: output `j` of a row is bit `j % 8` (least significant first) of
//! byte `j / 8`, so a row of `n` labels costs `ceil(n / 8)` bytes.

/// Bytes per packed row of `n` labels.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(8)
}

/// Appends the packed form of `row` to `out`.
pub fn pack_row(row: &[bool], out: &mut Vec<u8>) {
    for chunk in row.chunks(8) {
        let mut byte = 0u8;
        for (bit, &on) in chunk.iter().enumerate() {
            byte |= (on as u8) << bit;
        }
        out.push(byte);
    }
}

/// Label `j` of a packed row.
#[inline]
pub fn get(packed: &[u8], j: usize) -> bool {
    packed[j / 8] >> (j % 8) & 1 == 1
}

/// Writes a packed row of `out.len()` labels as 0.0 / 1.0.
pub fn unpack_row_f32(packed: &[u8], out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = if get(packed, j) { 1.0 } else { 0.0 };
    }
}

/// Number of set labels in a packed row (padding bits are always 0).
pub fn count_ones(packed: &[u8]) -> usize {
    packed.iter().map(|b| b.count_ones() as usize).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_for_every_length() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for n in [1usize, 7, 8, 9, 15, 16, 17, 1024, 1031] {
            let row: Vec<bool> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state & 4 == 0
                })
                .collect();
            let mut packed = Vec::new();
            pack_row(&row, &mut packed);
            assert_eq!(packed.len(), packed_len(n));
            let mut back = vec![0.0f32; n];
            unpack_row_f32(&packed, &mut back);
            for j in 0..n {
                assert_eq!(back[j] == 1.0, row[j], "n {n} label {j}");
                assert_eq!(get(&packed, j), row[j]);
            }
            assert_eq!(count_ones(&packed), row.iter().filter(|&&b| b).count());
        }
        let mut packed = Vec::new();
        pack_row(&[true, false, false, true, false, false, false, false, true], &mut packed);
        assert_eq!(packed, vec![0b0000_1001, 0b0000_0001]);
    }
}
