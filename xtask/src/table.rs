//! Plain-text and Markdown tables for the reports (conformance, benchmarks).

use std::fmt::Write as _;

/// Columns padded to their widest cell. A row whose third cell is empty is a message (the
/// second cell says why a target did not run): it is printed as is and does not widen the
/// columns after the first.
pub fn text_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let is_message = |row: &[String; N]| row.get(2).is_some_and(String::is_empty);
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        widths[0] = widths[0].max(row[0].chars().count());
    }
    for row in rows.iter().filter(|row| !is_message(row)) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::from(" ");
        for (cell, width) in cells.iter().zip(&widths) {
            let _ = write!(text, " {cell:<width$}");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        if is_message(row) {
            line(vec![&row[0], &row[1]]);
        } else {
            line(row.iter().map(String::as_str).collect());
        }
    }
    out
}

/// A Markdown table.
pub fn markdown_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut md = format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(N));
    for row in rows {
        let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
        let _ = writeln!(md, "| {} |", cells.join(" | "));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up() {
        let rows = vec![
            [
                "ext4".to_owned(),
                "383".to_owned(),
                "0".to_owned(),
                "15".to_owned(),
            ],
            [
                "deltafs".to_owned(),
                "not run: no binary".to_owned(),
                String::new(),
                String::new(),
            ],
        ];
        let header = ["target", "passed", "failed", "skipped"];
        assert_eq!(
            text_table(&header, &rows),
            "  target  passed failed skipped\n  ext4    383    0      15\n  deltafs not run: no \
             binary\n"
        );
        assert_eq!(
            markdown_table(&header, &rows),
            "| target | passed | failed | skipped |\n|---|---|---|---|\n| ext4 | 383 | 0 | 15 |\n\
             | deltafs | not run: no binary |  |  |\n"
        );
    }
}
