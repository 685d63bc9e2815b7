//! The README's measured tables that a test can recompute stay what the commands
//! print today.

/// The rows of the markdown table in `text` whose header starts with `header`.
fn table_after<'t>(text: &'t str, header: &str) -> Vec<&'t str> {
    text.lines()
        .skip_while(|line| !line.starts_with(header))
        .take_while(|line| line.starts_with('|'))
        .collect()
}

#[test]
fn the_readmes_shootdown_table_is_what_flush_counts_prints() {
    const HEADER: &str = "| scenario | lazy: shootdowns |";
    let readme = include_str!("../README.md");
    let printed = vmalloc_sim::scenarios::shootdown_table();
    let in_readme = table_after(readme, HEADER);
    assert!(!in_readme.is_empty(), "the README has the table");
    assert_eq!(
        in_readme.join("\n"),
        table_after(&printed, HEADER).join("\n"),
        "the README's shootdown table is stale: paste what \
         `cargo run --release --example flush_counts` prints"
    );
}
