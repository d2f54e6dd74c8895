// Package testpki makes a throwaway X.509 PKI for tests: a CA, a server
// certificate for 127.0.0.1 and localhost, and a client certificate, in
// the file layout libnbd and qemu's tls-creds-x509 read.
package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// PKI is one test PKI: the server's files and a client certificate
// directory in the layout libnbd and qemu's tls-creds-x509 (endpoint
// client) both read: ca-cert.pem, client-cert.pem, client-key.pem.
type PKI struct {
	ServerCert, ServerKey, CA string
	ClientDir                 string
	Client                    tls.Certificate // for Go clients
	Roots                     *x509.CertPool
}

type keyPair struct {
	cert *x509.Certificate
	der  []byte
	key  *ecdsa.PrivateKey
}

func newCert(t testing.TB, tmpl *x509.Certificate, parent *keyPair) *keyPair {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl.SerialNumber = big.NewInt(time.Now().UnixNano())
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(24 * time.Hour)
	signer, signerCert := key, tmpl
	if parent != nil {
		signer, signerCert = parent.key, parent.cert
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signerCert, &key.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &keyPair{cert: cert, der: der, key: key}
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func writeKey(t testing.TB, path string, k *ecdsa.PrivateKey) {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, path, "PRIVATE KEY", der)
}

// New makes a CA, a server certificate for 127.0.0.1 and localhost,
// and a client certificate, all under a fresh directory.
func New(t testing.TB) *PKI {
	t.Helper()
	dir := t.TempDir()
	ca := newCert(t, &x509.Certificate{
		Subject: pkix.Name{CommonName: "blktap test CA"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}, nil)
	srv := newCert(t, &x509.Certificate{
		Subject: pkix.Name{CommonName: "localhost"}, DNSNames: []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, BasicConstraintsValid: true,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca)
	cli := newCert(t, &x509.Certificate{
		Subject: pkix.Name{CommonName: "blktap test client"}, BasicConstraintsValid: true,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca)
	p := &PKI{
		ServerCert: filepath.Join(dir, "server-cert.pem"), ServerKey: filepath.Join(dir, "server-key.pem"),
		CA: filepath.Join(dir, "ca-cert.pem"), ClientDir: filepath.Join(dir, "client"),
		Roots: x509.NewCertPool(),
	}
	p.Roots.AddCert(ca.cert)
	if err := os.Mkdir(p.ClientDir, 0o700); err != nil {
		t.Fatal(err)
	}
	writePEM(t, p.CA, "CERTIFICATE", ca.der)
	writePEM(t, p.ServerCert, "CERTIFICATE", srv.der)
	writeKey(t, p.ServerKey, srv.key)
	writePEM(t, filepath.Join(p.ClientDir, "ca-cert.pem"), "CERTIFICATE", ca.der)
	writePEM(t, filepath.Join(p.ClientDir, "client-cert.pem"), "CERTIFICATE", cli.der)
	writeKey(t, filepath.Join(p.ClientDir, "client-key.pem"), cli.key)
	p.Client = tls.Certificate{Certificate: [][]byte{cli.der}, PrivateKey: cli.key}
	return p
}
