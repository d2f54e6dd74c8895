package nbd

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
)

// ErrTLSConfig is the class of errors about TLS certificate files.
var ErrTLSConfig = errors.New("nbd: bad TLS configuration")

// LoadTLSConfig builds a Server.TLSConfig from PEM files: the server's
// certificate chain and private key and, when caFile is not empty, the CA
// that client certificates must chain to. With a CA, a client without a
// valid certificate fails the TLS handshake; without one, any client that
// completes TLS is served (the channel is encrypted, not authenticated).
//
// Only X.509 is offered: Go's crypto/tls has no TLS-PSK, so qemu's
// tls-creds-psk and nbdkit's --tls-psk have no counterpart here. TLS 1.2
// is the oldest version accepted, as proto.md asks.
func LoadTLSConfig(certFile, keyFile, caFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("%w: certificate %s, key %s: %w", ErrTLSConfig, certFile, keyFile, err)
	}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("%w: CA: %w", ErrTLSConfig, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%w: CA %s holds no PEM certificate", ErrTLSConfig, caFile)
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// bufferedConn reads through r, a bufio.Reader on Conn that may already
// hold bytes the peer sent after STARTTLS (its ClientHello), and writes
// straight to Conn.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }
