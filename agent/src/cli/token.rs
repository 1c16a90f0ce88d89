//! `novabackup token create|list|revoke`: API tokens with roles.

use novabackup_api::auth::{CreateToken, Role};
use novabackup_api::Client;

/// Token commands.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Make a token; its secret is printed once and only a hash is kept.
    Create {
        /// A name for people (who or what uses it).
        name: String,
        /// admin, backup or read-only.
        #[arg(long, default_value = "read-only")]
        role: Role,
        /// For a backup token: a disk it may back up and restore (repeat; default all).
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never their secrets).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id.
    Revoke {
        /// The id from `token list`.
        id: String,
    },
}

/// Runs a token command.
pub fn run(client: &Client, c: TokenCommand) -> anyhow::Result<()> {
    match c {
        TokenCommand::Create {
            name,
            role,
            disks,
            json,
        } => {
            let t = client.create_token(&CreateToken { name, role, disks })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!("{}", t.token);
                eprintln!(
                    "token {} ({:?}) created; the secret above is shown only this once",
                    t.info.id, t.info.role
                );
            }
        }
        TokenCommand::List { json } => {
            let list = client.tokens()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!(
                    "no tokens besides api.token (`novabackup token create NAME --role ROLE`)"
                );
            } else {
                println!(
                    "{:<10} {:<10} {:<22} {:<20} NAME",
                    "ID", "ROLE", "CREATED", "DISKS"
                );
                for t in list {
                    let role = serde_json::to_value(t.role)?;
                    let disks = if t.disks.is_empty() {
                        "all".to_string()
                    } else {
                        t.disks.join(",")
                    };
                    println!(
                        "{:<10} {:<10} {:<22} {:<20} {}",
                        t.id,
                        role.as_str().unwrap_or(""),
                        t.created,
                        disks,
                        t.name
                    );
                }
            }
        }
        TokenCommand::Revoke { id } => {
            client.revoke_token(&id)?;
            println!("token {id} revoked");
        }
    }
    Ok(())
}
