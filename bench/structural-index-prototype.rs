//! Scratch prototype behind bench/README.md, "The structural index, tried". It is not part of
//! the crate and nothing builds it: the numbers in the README came from
//!
//!   cargo new --bin /tmp/proto && cp bench/structural-index-prototype.rs /tmp/proto/src/main.rs
//!   (cd /tmp/proto && cargo add safe_arch@1.2 && cargo build --release)
//!   valgrind --tool=callgrind /tmp/proto/target/release/proto 2000 bench/send-notification-events.xml
//!   # and again with 4000: instructions per body = the difference / 2000
//!
//! `index` is the first pass (bitmaps of `<`, `>`, `"` and non-letters, the `&`/non-ASCII
//! test, `<`/`>` alternation by prefix XOR); `walk` the tag reader that jumps between the
//! marks. It checks less than `src/ews/fast.rs` does (no element matching, no summary) and
//! was never tested beyond the bench body: a measurement, not a parser.
#![forbid(unsafe_code)]
#![allow(dead_code)] // fields kept to mirror the real tables
use std::hint::black_box;

#[derive(Clone, Copy, Default)]
struct Block {
    lt: u64,
    gt: u64,
    quote: u64,
    nl: u64,
}

/// Phase 1: bitmaps per 64 bytes; false if any '&', non-ASCII, or '<' '>' not alternating.
#[inline(never)]
fn index(body: &[u8], out: &mut Vec<Block>) -> bool {
    use safe_arch::*;
    out.clear();
    let (sl, sg, sq, sa) = (
        set_splat_i8_m128i(b'<' as i8),
        set_splat_i8_m128i(b'>' as i8),
        set_splat_i8_m128i(b'"' as i8),
        set_splat_i8_m128i(b'&' as i8),
    );
    let (s20, sa_, s25) = (
        set_splat_i8_m128i(0x20),
        set_splat_i8_m128i(b'a' as i8),
        set_splat_i8_m128i(25),
    );
    let mut bad = zeroed_m128i();
    let mut parity = 0u64; // all ones when inside a tag at the block boundary
    let mut err = 0u64;
    let mut chunks = body.chunks_exact(64);
    let one = |c: &[u8; 64], bad: &mut m128i| -> Block {
        let mut b = Block::default();
        for k in 0..4 {
            let v = load_unaligned_m128i(c[k * 16..k * 16 + 16].try_into().unwrap());
            let sh = 16 * k;
            b.lt |= (move_mask_i8_m128i(cmp_eq_mask_i8_m128i(v, sl)) as u32 as u64) << sh;
            b.gt |= (move_mask_i8_m128i(cmp_eq_mask_i8_m128i(v, sg)) as u32 as u64) << sh;
            b.quote |= (move_mask_i8_m128i(cmp_eq_mask_i8_m128i(v, sq)) as u32 as u64) << sh;
            let low = sub_i8_m128i(bitor_m128i(v, s20), sa_);
            let letter = cmp_eq_mask_i8_m128i(min_u8_m128i(low, s25), low);
            b.nl |= (!(move_mask_i8_m128i(letter) as u32) as u64 & 0xFFFF) << sh;
            *bad = bitor_m128i(*bad, bitor_m128i(v, cmp_eq_mask_i8_m128i(v, sa)));
        }
        b
    };
    for c in &mut chunks {
        let b = one(c.try_into().unwrap(), &mut bad);
        out.push(b);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut c = [b' '; 64];
        c[..rest.len()].copy_from_slice(rest);
        let mut b = one(&c, &mut bad);
        b.nl |= !0u64 << rest.len(); // padding is not letters
        out.push(b);
    }
    for b in out.iter() {
        let m = b.lt | b.gt;
        let mut x = m;
        x ^= x << 1;
        x ^= x << 2;
        x ^= x << 4;
        x ^= x << 8;
        x ^= x << 16;
        x ^= x << 32;
        let px = x ^ parity;
        err |= (b.lt & !px) | (b.gt & px);
        parity = 0u64.wrapping_sub(px >> 63);
    }
    move_mask_i8_m128i(bad) == 0 && err == 0 && parity == 0
}

struct Ix<'a> {
    b: &'a [Block],
}
impl Ix<'_> {
    #[inline(always)]
    fn next(&self, f: impl Fn(&Block) -> u64, from: usize) -> usize {
        let mut i = from / 64;
        let Some(blk) = self.b.get(i) else {
            return usize::MAX / 2;
        };
        let w = f(blk) >> (from % 64);
        if w != 0 {
            return from + w.trailing_zeros() as usize;
        }
        loop {
            i += 1;
            let Some(blk) = self.b.get(i) else {
                return usize::MAX / 2;
            };
            let w = f(blk);
            if w != 0 {
                return i * 64 + w.trailing_zeros() as usize;
            }
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Open {
    at: u32,
    len: u32,
    bindings: u32,
}
#[derive(Clone, Copy, Default)]
struct Attr {
    key: u32,
    klen: u32,
    kw: u64,
    v: u32,
    vlen: u32,
}

fn word(bytes: &[u8], at: usize) -> u64 {
    match bytes.get(at..at + 8) {
        Some(c) => u64::from_le_bytes(c.try_into().unwrap()),
        None => {
            let mut c = [0xFF; 8];
            let r = bytes.get(at..).unwrap_or_default();
            c[..r.len()].copy_from_slice(r);
            u64::from_le_bytes(c)
        }
    }
}
fn low_bytes(n: usize) -> u64 {
    u64::MAX.checked_shr(64 - 8 * n as u32).unwrap_or(0)
}
fn same(bytes: &[u8], a: usize, b: usize, len: usize) -> bool {
    if len <= 8 {
        return (word(bytes, a) ^ word(bytes, b)) & low_bytes(len) == 0;
    }
    let mut i = 0;
    while i + 8 < len {
        if word(bytes, a + i) != word(bytes, b + i) {
            return false;
        }
        i += 8;
    }
    word(bytes, a + len - 8) == word(bytes, b + len - 8)
}
fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Name at `start`: (end, colon). Steps over digits . - _ and one colon.
#[inline(always)]
fn name(ix: &Ix, bytes: &[u8], start: usize) -> Option<(usize, Option<usize>)> {
    if !is_name_start(*bytes.get(start)?) {
        return None;
    }
    let mut colon = None;
    let mut e = ix.next(|b| b.nl, start + 1);
    loop {
        let c = *bytes.get(e)?;
        match c {
            b'0'..=b'9' | b'.' | b'-' | b'_' => {}
            b':' if colon.is_none() => {
                if !is_name_start(*bytes.get(e + 1)?) {
                    return None;
                }
                colon = Some(e);
            }
            _ => return Some((e, colon)),
        }
        e = ix.next(|b| b.nl, e + 1);
    }
}

struct St {
    open: [Open; 64],
    depth: usize,
    attrs: [Attr; 32],
    nattr: usize,
    bind: [(u64, u8); 32],
    nbind: usize,
}

#[inline(never)]
fn walk(bytes: &[u8], blocks: &[Block], st: &mut St) -> Option<u64> {
    let ix = Ix { b: blocks };
    let mut sum = 0u64;
    // skip declaration
    let mut pos = 0;
    if bytes.starts_with(b"<?") {
        pos = ix.next(|b| b.gt, 0) + 1;
    }
    st.depth = 0;
    st.nbind = 0;
    let mut started = false;
    loop {
        let p = ix.next(|b| b.lt, pos);
        if p >= bytes.len() {
            break;
        }
        if started && st.depth == 0 {
            return None;
        }
        started = true;
        let q = ix.next(|b| b.gt, p);
        let b1 = *bytes.get(p + 1)?;
        if b1 == b'/' {
            let o = *st.open.get(st.depth.checked_sub(1)?)?;
            let len = o.len as usize;
            if !same(bytes, p + 2, o.at as usize, len) {
                return None;
            }
            if q != p + 2 + len {
                if !bytes[p + 2 + len..q].iter().all(|&b| is_space(b)) {
                    return None;
                }
            }
            st.depth -= 1;
            st.nbind = o.bindings as usize;
            // text of a leaf: between previous tag end and p
            sum = sum.wrapping_add((p - pos) as u64);
            pos = q + 1;
            continue;
        }
        let (e, colon) = name(&ix, bytes, p + 1)?;
        let prefix = match colon {
            Some(c) => {
                let l = c - (p + 1);
                if l > 8 {
                    return None;
                }
                word(bytes, p + 1) & low_bytes(l)
            }
            None => 0,
        };
        let bindings = st.nbind as u32;
        st.nattr = 0;
        let mut empty = false;
        let mut a = e;
        loop {
            let c = *bytes.get(a)?;
            if c == b'>' {
                break;
            }
            if c == b'/' {
                if a + 1 != q {
                    return None;
                }
                empty = true;
                break;
            }
            if !is_space(c) {
                return None;
            }
            a += 1;
            while is_space(*bytes.get(a)?) {
                a += 1;
            }
            let c = bytes[a];
            if c == b'>' || c == b'/' {
                continue;
            }
            let (ke, kc) = name(&ix, bytes, a)?;
            let mut eq = ke;
            while is_space(*bytes.get(eq)?) {
                eq += 1;
            }
            if bytes[eq] != b'=' {
                return None;
            }
            let mut oq = eq + 1;
            while is_space(*bytes.get(oq)?) {
                oq += 1;
            }
            if bytes[oq] != b'"' {
                return None;
            }
            let ve = ix.next(|b| b.quote, oq + 1);
            if ve > q {
                return None;
            }
            let klen = ke - a;
            let kw = word(bytes, a) & low_bytes(klen.min(8));
            for s in &st.attrs[..st.nattr] {
                if s.kw == kw
                    && s.klen as usize == klen
                    && (klen <= 8 || same(bytes, s.key as usize, a, klen))
                {
                    return None;
                }
            }
            if st.nattr == 32 {
                return None;
            }
            st.attrs[st.nattr] = Attr {
                key: a as u32,
                klen: klen as u32,
                kw,
                v: (oq + 1) as u32,
                vlen: (ve - oq - 1) as u32,
            };
            st.nattr += 1;
            if kw & low_bytes(5) == 0x736e6c6d78 {
                let pk = match kc {
                    None if klen == 5 => Some(0),
                    Some(c) if c == a + 5 => {
                        Some(word(bytes, c + 1) & low_bytes((ke - c - 1).min(8)))
                    }
                    _ => None,
                };
                if let Some(pk) = pk {
                    if st.nbind == 32 {
                        return None;
                    }
                    st.bind[st.nbind] = (pk, (ve - oq) as u8);
                    st.nbind += 1;
                }
            }
            a = ve + 1;
        }
        if st.depth == 64 {
            return None;
        }
        st.open[st.depth] = Open {
            at: (p + 1) as u32,
            len: (e - p - 1) as u32,
            bindings,
        };
        st.depth += 1;
        let ns = st.bind[..st.nbind]
            .iter()
            .rev()
            .find(|b| b.0 == prefix)
            .map_or(0, |b| b.1);
        sum = sum.wrapping_add(ns as u64 + st.nattr as u64);
        if empty {
            st.depth -= 1;
            st.nbind = bindings as usize;
        }
        pos = q + 1;
    }
    if st.depth != 0 {
        return None;
    }
    Some(sum)
}

fn main() {
    let path = std::env::args()
        .nth(2)
        .unwrap_or("bench/send-notification-events.xml".into());
    let body = std::fs::read(path).unwrap();
    let n: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let mut blocks = Vec::with_capacity(body.len() / 64 + 2);
    let mut st = St {
        open: [Open::default(); 64],
        depth: 0,
        attrs: [Attr::default(); 32],
        nattr: 0,
        bind: [(0, 0); 32],
        nbind: 0,
    };
    let mut s = 0u64;
    for _ in 0..n {
        let b = black_box(&body[..]);
        let ok = index(b, &mut blocks);
        s += ok as u64;
        s += walk(b, &blocks, &mut st).unwrap_or(999999);
    }
    println!("{s}");
}
