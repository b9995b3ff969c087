//! KV-cache blocks as workers publish them and coordinators match them.
//!
//! A block is [`BLOCK_TOKENS`] consecutive tokens of a sequence, starting
//! at a multiple of [`BLOCK_TOKENS`]; only whole blocks count. A block is
//! named by a hash chained over every token id of the prefix up to its end
//! ([`block_hashes`]), so one hash stands for the whole prefix: two
//! sequences share a block hash exactly when they share every token up to
//! that block's end. Workers and coordinators compute it with this one
//! function, so they cannot disagree.
//!
//! The hash is FNV-1a (64 bits) over the parent block's hash and the
//! block's token ids (little-endian i32), then a 64-bit finaliser: stable
//! across builds, platforms and compiler versions (std's hashers are not
//! promised to be), and cheap (a 2,048-token prompt hashes in a few
//! microseconds).

/// Tokens per block. 16, as vLLM's and llama.cpp's server's defaults: small
/// enough that a shared prefix loses at most 15 tokens at its end, large
/// enough that a worker's whole cache (8,192 cells by default) is 512
/// hashes.
pub const BLOCK_TOKENS: usize = 16;

/// The hash a chain starts from (the empty prefix).
const ROOT: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The hash of the block of `tokens` (exactly [`BLOCK_TOKENS`] of them)
/// that follows the block hashed `parent` (`None`: the first block).
pub fn next_hash(parent: Option<u64>, tokens: &[i32]) -> u64 {
    debug_assert_eq!(tokens.len(), BLOCK_TOKENS);
    let mut h = ROOT;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    };
    eat(&parent.unwrap_or(0).to_le_bytes());
    eat(&[u8::from(parent.is_some())]);
    for t in tokens {
        eat(&t.to_le_bytes());
    }
    // splitmix64's finaliser spreads FNV's weak low bits.
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The hashes of `tokens`' whole blocks, in order (a trailing partial block
/// has none).
pub fn block_hashes(tokens: &[i32]) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / BLOCK_TOKENS);
    let mut parent = None;
    for block in tokens.chunks_exact(BLOCK_TOKENS) {
        let h = next_hash(parent, block);
        out.push(h);
        parent = Some(h);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_names_its_whole_prefix() {
        let a: Vec<i32> = (0..64).collect();
        let mut b = a.clone();
        b[20] = 999; // in the second block
        let (ha, hb) = (block_hashes(&a), block_hashes(&b));
        assert_eq!(ha.len(), 4);
        assert_eq!(ha[0], hb[0]);
        // Every block from the change on differs, even where the block's
        // own tokens are the same.
        assert!(ha[1..].iter().zip(&hb[1..]).all(|(x, y)| x != y));
        // A partial block has no hash; a longer sequence extends the chain.
        assert_eq!(block_hashes(&a[..63]), ha[..3]);
        let longer: Vec<i32> = (0..80).collect();
        assert_eq!(block_hashes(&longer)[..4], ha[..]);
        // The same block at another position is another block.
        let repeated: Vec<i32> = (0..16).chain(0..16).collect();
        let h = block_hashes(&repeated);
        assert_ne!(h[0], h[1]);
    }

    #[test]
    fn hashes_are_stable_across_builds() {
        // Pinned values: a change here breaks every coordinator talking to
        // a worker built before it.
        let tokens: Vec<i32> = (1..=32).collect();
        let h = block_hashes(&tokens);
        assert_eq!(h, block_hashes(&tokens));
        assert_eq!(h.len(), 2);
        let pinned = [h[0], h[1]];
        assert_eq!(pinned, PINNED, "block hashes changed: {pinned:#x?}");
    }

    const PINNED: [u64; 2] = [0x677e_1e2b_18b1_9110, 0x349a_5183_7c1a_c3d2];
}
