# The Raspberry Pi class device (devices with `config = "pi"` in fleet.toml).
{
  hostName = "pi";
  board = "rpi4";
  release = "24.11";
  motd = "reup fleet: sensor node";
  libsensor = "2.1";
  sensord = { version = "1.4.0"; interval = 5; sensors = [ "temp" "humidity" "light" ]; };
}
