//! `sluice check-config PATH`.

use std::path::PathBuf;

use clap::Args;

use crate::config::{Config, DEFAULT_CONFIG_TOML};
use crate::exit;

/// Arguments of `check-config`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The config file to check.
    #[arg(value_name = "PATH", required_unless_present = "print_default")]
    pub path: Option<PathBuf>,

    /// Print the embedded default config (a commented starting point).
    #[arg(long, conflicts_with = "path")]
    pub print_default: bool,
}

/// Run `check-config`.
pub fn run(args: &CheckArgs) -> i32 {
    if args.print_default {
        print!("{DEFAULT_CONFIG_TOML}");
        return exit::OK;
    }
    let Some(path) = &args.path else {
        return exit::USAGE;
    };
    match Config::load(path) {
        Ok(c)
            if c.region
                .group
                .as_ref()
                .is_some_and(|g| nix::unistd::Group::from_name(g).ok().flatten().is_none()) =>
        {
            let g = c.region.group.unwrap_or_default();
            crate::cli::fail(
                exit::CONFIG,
                format!(
                    "{}: region.group {g:?} does not exist on this host: create it (see packaging/sluice.sysusers) or remove the setting",
                    path.display()
                ),
            )
        }
        Ok(c) => {
            let names: Vec<&str> = c.classes.iter().map(|c| c.name.as_str()).collect();
            let plural = |n: usize, one: &str, many: &str| {
                format!("{n} {}", if n == 1 { one } else { many })
            };
            println!(
                "{}: ok: {} ({}), {}, tenants {}",
                path.display(),
                plural(c.classes.len(), "class", "classes"),
                names.join(", "),
                plural(c.dependencies.len(), "dependency", "dependencies"),
                if c.tenants.is_some() { "on" } else { "off" }
            );
            exit::OK
        }
        Err(e) => crate::cli::fail(exit::CONFIG, e),
    }
}
