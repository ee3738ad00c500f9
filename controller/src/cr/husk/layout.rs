//! Planning a husk's address space change: where the kernel's special mappings go,
//! what is unmapped, where scratch room is. Pure functions over `/proc/<pid>/maps`.

use crate::cr::dump::PAGE;
use crate::cr::procfs::Mapping;

/// User space ends below 2^47; `[vsyscall]` above it is never touched.
const TOP: u64 = 0x7fff_ffff_f000;

/// Mappings the kernel places that move with the vdso: `[vvar]`, `[vvar_vclock]`,
/// `[vdso]` (their relative layout is fixed by the kernel). `[vsyscall]` is fixed and
/// above user space; `[uprobes]` belongs to no program.
pub fn moves_with_vdso(name: &str) -> bool {
    matches!(name, "[vdso]" | "[vvar]" | "[vvar_vclock]")
}

/// One `mremap` of a special mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    /// Where it is.
    pub from: u64,
    /// Its length.
    pub len: u64,
    /// Where it goes.
    pub to: u64,
}

/// The `mremap`s that shift the mappings `specials` (start, end) by `to - from_vdso`,
/// keeping their relative layout: at once when the shifted block does not overlap
/// the current one, else through the free range `via` (of the block's size, found by
/// the caller with [`free_gap`]), so that no move lands on a mapping not moved yet.
pub fn special_moves(specials: &[(u64, u64)], from_vdso: u64, to: u64, via: u64) -> Vec<Move> {
    let (Some(lo), Some(hi)) = (
        specials.iter().map(|s| s.0).min(),
        specials.iter().map(|s| s.1).max(),
    ) else {
        return Vec::new();
    };
    if to == from_vdso {
        return Vec::new();
    }
    let shift = |base: u64, target: u64| -> Vec<Move> {
        specials
            .iter()
            .map(|&(s, e)| Move {
                from: s - lo + base,
                len: e - s,
                to: s - lo + target,
            })
            .collect()
    };
    let new_lo = lo.wrapping_add(to).wrapping_sub(from_vdso);
    let overlaps = new_lo < hi && new_lo + (hi - lo) > lo;
    if overlaps {
        let mut moves = shift(lo, via);
        moves.extend(shift(via, new_lo));
        moves
    } else {
        shift(lo, new_lo)
    }
}

/// The start of a free range of `len` bytes, a page clear on each side, outside all
/// of `ranges` (start, end) and above the first 64 KiB: the highest such gap below the
/// top range.
pub fn free_gap(mut ranges: Vec<(u64, u64)>, len: u64) -> Option<u64> {
    ranges.retain(|(s, _)| *s < TOP);
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let need = len + 2 * PAGE;
    merged
        .windows(2)
        .rev()
        .find(|w| w[1].0 - w[0].1 >= need && w[0].1 >= 0x10000)
        .map(|w| w[1].0 - PAGE - len)
}

/// The ranges to `munmap` so that of `maps` only the mappings that move with the vdso,
/// `[vsyscall]` and the range `keep` remain: adjacent mappings joined into one range.
pub fn unmap_ranges(maps: &[Mapping], keep: (u64, u64)) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for m in maps {
        if moves_with_vdso(&m.name) || m.start >= TOP {
            continue;
        }
        for piece in without(m.start, m.end, keep) {
            match out.last_mut() {
                Some(last) if last.1 == piece.0 => last.1 = piece.1,
                _ => out.push(piece),
            }
        }
    }
    out
}

/// `[start, end)` without `hole`.
fn without(start: u64, end: u64, hole: (u64, u64)) -> Vec<(u64, u64)> {
    let (hs, he) = hole;
    if he <= start || hs >= end {
        return vec![(start, end)];
    }
    let mut out = Vec::new();
    if start < hs {
        out.push((start, hs));
    }
    if he < end {
        out.push((he, end));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(start: u64, end: u64, name: &str) -> Mapping {
        Mapping {
            start,
            end,
            perms: *b"r--p",
            offset: 0,
            inode: 0,
            name: name.to_owned(),
        }
    }

    /// `[vvar]` 4 pages, `[vvar_vclock]` 2, `[vdso]` 2, as on this machine's kernel.
    fn specials(vvar: u64) -> Vec<(u64, u64)> {
        vec![
            (vvar, vvar + 4 * PAGE),
            (vvar + 4 * PAGE, vvar + 6 * PAGE),
            (vvar + 6 * PAGE, vvar + 8 * PAGE),
        ]
    }

    #[test]
    fn specials_move_at_once_when_far() {
        let sp = specials(0x7f00_0000_0000);
        let vdso = 0x7f00_0000_0000 + 6 * PAGE;
        let to = 0x7e00_0000_6000;
        let moves = special_moves(&sp, vdso, to, 0);
        assert_eq!(moves.len(), 3);
        assert_eq!(
            moves[2],
            Move {
                from: vdso,
                len: 2 * PAGE,
                to
            }
        );
        assert_eq!(moves[0].to, to - 6 * PAGE);
        assert!(special_moves(&sp, vdso, vdso, 0).is_empty());
    }

    #[test]
    fn overlapping_specials_go_through_a_free_range() {
        let base = 0x7f00_0000_0000;
        let sp = specials(base);
        let vdso = base + 6 * PAGE;
        // Up by 3 pages: the block would land on itself.
        let moves = special_moves(&sp, vdso, vdso + 3 * PAGE, 0x1000_0000);
        assert_eq!(moves.len(), 6);
        assert_eq!(
            moves[0],
            Move {
                from: base,
                len: 4 * PAGE,
                to: 0x1000_0000
            }
        );
        assert_eq!(
            moves[5],
            Move {
                from: 0x1000_0000 + 6 * PAGE,
                len: 2 * PAGE,
                to: vdso + 3 * PAGE
            }
        );
    }

    #[test]
    fn free_gaps_are_clear_of_every_range() {
        let ranges = vec![(0x40_0000, 0x50_0000), (0x7f00_0000_0000, 0x7f00_0010_0000)];
        let at = free_gap(ranges.clone(), 8 * PAGE).unwrap();
        assert_eq!(at, 0x7f00_0000_0000 - PAGE - 8 * PAGE);
        assert!(free_gap(vec![(0x1000, 0x2000)], PAGE).is_none());
    }

    #[test]
    fn everything_but_the_specials_and_the_kept_range_is_unmapped() {
        let maps = vec![
            mapping(0x1000, 0x3000, "/bin/x"),
            mapping(0x3000, 0x4000, ""),
            mapping(0x8000, 0xa000, "[heap]"),
            mapping(0x10000, 0x12000, "[vvar]"),
            mapping(0x12000, 0x14000, "[vdso]"),
            mapping(0x20000, 0x30000, ""),
            mapping(0xffff_ffff_ff60_0000, 0xffff_ffff_ff60_1000, "[vsyscall]"),
        ];
        assert_eq!(
            unmap_ranges(&maps, (0x21000, 0x22000)),
            vec![
                (0x1000, 0x4000),
                (0x8000, 0xa000),
                (0x20000, 0x21000),
                (0x22000, 0x30000)
            ]
        );
    }
}
