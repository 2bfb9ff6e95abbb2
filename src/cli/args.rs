//! A small argument parser: `--flag value`, `--flag=value`, boolean `--flag`, positionals.

use super::error::{usage, CliError};

#[derive(Clone)]
pub struct Args {
    items: Vec<String>,
}

impl Args {
    pub fn new(items: Vec<String>) -> Self {
        Args { items }
    }

    /// Removes `--name value` (or `--name=value`); the last occurrence wins.
    pub fn option(&mut self, name: &str) -> Result<Option<String>, CliError> {
        let flag = format!("--{name}");
        let prefix = format!("--{name}=");
        let mut found = None;
        let mut i = 0;
        while i < self.items.len() {
            if self.items.get(i).is_some_and(|a| *a == flag) {
                if i + 1 >= self.items.len() {
                    return Err(usage(format!("{flag} needs a value")));
                }
                let value = self.items.remove(i + 1);
                self.items.remove(i);
                found = Some(value);
            } else if let Some(value) = self.items.get(i).and_then(|a| a.strip_prefix(&prefix)) {
                found = Some(value.to_string());
                self.items.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(found)
    }

    pub fn required(&mut self, name: &str) -> Result<String, CliError> {
        self.option(name)?
            .ok_or_else(|| usage(format!("--{name} is required")))
    }

    /// Removes a boolean `--name`.
    pub fn flag(&mut self, name: &str) -> bool {
        let flag = format!("--{name}");
        let before = self.items.len();
        self.items.retain(|a| *a != flag);
        self.items.len() != before
    }

    /// The next positional argument.
    pub fn positional(&mut self, what: &str) -> Result<String, CliError> {
        let index = self
            .items
            .iter()
            .position(|a| !a.starts_with("--"))
            .ok_or_else(|| usage(format!("missing {what}")))?;
        Ok(self.items.remove(index))
    }

    /// Fails on anything not consumed, so typos never pass silently.
    pub fn finish(self) -> Result<(), CliError> {
        match self.items.first() {
            None => Ok(()),
            Some(flag) if flag.starts_with("--") => Err(usage(format!("unexpected option '{flag}'"))),
            // Not echoed: an operator who pastes a key where it does not belong must not find it
            // in the terminal scrollback and CI logs as well.
            Some(_) => Err(usage(
                "unexpected argument (not shown; secrets are read from stdin or --from-env, never argv)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::new(list.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn options_flags_and_positionals() {
        let mut a = args(&["alice", "--owner", "a@x", "--force", "--ttl=1h"]);
        assert_eq!(a.option("owner").unwrap().as_deref(), Some("a@x"));
        assert_eq!(a.option("ttl").unwrap().as_deref(), Some("1h"));
        assert!(a.flag("force"));
        assert!(!a.flag("json"));
        assert_eq!(a.positional("id").unwrap(), "alice");
        assert!(a.finish().is_ok());
        let mut b = args(&["--owner"]);
        assert!(b.option("owner").is_err());
        assert!(args(&["--oops"]).finish().is_err());
    }
}
