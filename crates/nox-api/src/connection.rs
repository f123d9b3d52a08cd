//! Noticing that a client went away while its request is still being
//! handled. actix-web drops a handler whose client reset the connection,
//! but one that only closed its side (FIN) runs on to the end and its answer
//! is written into the void; work that outlives a client (a command) has to
//! watch for it. Each connection keeps a duplicate of its socket's
//! descriptor (`HttpServer::on_connect`), and [`client_gone`] polls it.

use std::any::Any;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use actix_web::HttpRequest;
use actix_web::dev::Extensions;
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};

/// How often [`client_gone`] looks.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// The connection's socket (close-on-exec, so no command inherits it).
#[derive(Debug)]
struct ClientSocket(OwnedFd);

/// For `HttpServer::on_connect`: remembers a TCP connection's socket.
pub fn remember_socket(connection: &dyn Any, data: &mut Extensions) {
    if let Some(stream) = connection.downcast_ref::<actix_web::rt::net::TcpStream>()
        && let Ok(socket) = stream.as_fd().try_clone_to_owned()
    {
        data.insert(ClientSocket(socket));
    }
}

/// Resolves once the client of `request` has closed or reset its
/// connection; never, when the connection's socket is unknown.
pub async fn client_gone(request: HttpRequest) {
    loop {
        match request.conn_data::<ClientSocket>() {
            Some(socket) if socket.peer_left() => return,
            Some(_) => tokio::time::sleep(POLL_EVERY).await,
            None => std::future::pending().await,
        }
    }
}

impl ClientSocket {
    /// Whether the peer shut down its side (a read would see the end) or
    /// reset the connection. Nothing waiting, or a pipelined request
    /// waiting, means it is still there.
    fn peer_left(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut byte = [0u8; 1];
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        match recv(self.0.as_raw_fd(), &mut byte, flags) {
            Ok(0) => true,
            Ok(_) => false,
            Err(Errno::EAGAIN | Errno::EINTR) => false,
            Err(_) => true,
        }
    }
}
