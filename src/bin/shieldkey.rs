//! The `shieldkey` CLI binary; everything lives in `shieldkey::cli`.

fn main() {
    let code = shieldkey::cli::run(std::env::args().skip(1).collect());
    std::process::exit(code);
}
